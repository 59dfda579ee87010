"""The LightningModule: target-only loss, learning on one batch, checkpoint contents."""

from __future__ import annotations

import pytest
import torch

from iamrec.attention import ItemAttentionConfig
from iamrec.data import IAMDataModule
from iamrec.lit_module import IAMRecModule
from iamrec.model import LoraConfig


def _batch(processed_dir, n=8):
    dm = IAMDataModule(str(processed_dir), "tiny", batch_size=n)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_target_loss_equals_hf_loss_on_target_tokens(processed_dir):
    batch = _batch(processed_dir)
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=None)
    module.configure_model()
    ours = module.target_loss(batch)
    hf = module.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        segment_ids=batch["segment_ids"],
        labels=batch["labels"],
    ).loss
    assert torch.allclose(ours, hf, atol=1e-5)


def test_overfitting_one_batch_drives_target_loss_down(processed_dir):
    torch.manual_seed(0)
    batch = _batch(processed_dir)
    # full fine-tuning: LoRA on a *random* tiny base learns too slowly to show in 40 steps
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=None, lr=3e-3)
    module.configure_model()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = module.target_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]  # a model that does not learn stays near ln(V) = 6.4


def test_lora_checkpoint_holds_only_adapters():
    module = IAMRecModule(backbone="tiny", lora=LoraConfig())
    module.configure_model()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    fresh = IAMRecModule(backbone="tiny", lora=LoraConfig())
    fresh.configure_model()
    fresh.load_state_dict(ckpt["state_dict"])
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_every_module_trains_in_train_mode_and_evaluates_in_eval_mode(processed_dir, tmp_path):
    """Lightning keeps the modes it finds at fit start: an eval-mode backbone would train without dropout."""
    import lightning as L

    modes: dict[str, set[bool]] = {"train": set(), "val": set()}

    class Recording(IAMRecModule):
        def training_step(self, batch, batch_idx):
            modes["train"] |= {m.training for m in self.modules()}
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            modes["val"] |= {m.training for m in self.modules()}
            return super().validation_step(batch, batch_idx)

    dm = IAMDataModule(str(processed_dir), "tiny", batch_size=4, max_train_samples=8, max_eval_samples=4)
    module = Recording(backbone="tiny", lora=LoraConfig(r=4, dropout=0.1), warmup_steps=0)
    module.configure_model()
    module.model.eval()  # as `from_pretrained` returns a real backbone
    trainer = L.Trainer(
        max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert modes == {"train": {True}, "val": {False}}


def _reference_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """The hand-written LambdaLR schedule of earlier releases (the numbers torch's schedulers must give)."""
    import math

    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else max(0.0, 1 - progress)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (0.25, 40), (5, 1000)])
def test_schedule_gives_the_numbers_of_the_old_formula(kind, warmup, total):
    from types import SimpleNamespace

    module = IAMRecModule(backbone="tiny", lora=LoraConfig(r=2), lr=2e-4, warmup_steps=warmup, scheduler=kind)
    module.configure_model()
    module._trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    steps = int(warmup * total) if warmup < 1 else warmup
    for step in range(total + 2):  # past the end too (a resumed run may take a step more)
        expected = 2e-4 * _reference_factor(step, steps, total, kind)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        optimizer.step()
        scheduler.step()


def test_warmup_longer_than_the_run_is_one_sentence():
    from types import SimpleNamespace

    module = IAMRecModule(backbone="tiny", lora=LoraConfig(r=2), warmup_steps=10)
    module.configure_model()
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    with pytest.raises(ValueError, match="model.warmup_steps=10 leaves no decay"):
        module.configure_optimizers()


def _boolean_index_loss(module, batch):
    """The loss as it was computed before the collator's target positions: boolean-mask indexing."""
    import torch.nn.functional as F

    hf = module.hf_model
    hidden = hf.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    where = labels != -100
    return F.cross_entropy(hf.get_output_embeddings()(hidden[:, :-1][where]).float(), labels[where])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_target_loss_without_host_sync_equals_boolean_index_loss(processed_dir, padding_side):
    dm = IAMDataModule(
        str(processed_dir), "tiny", batch_size=8, padding_side=padding_side, pad_to_multiple_of=16
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] % 16 == 0
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=None)
    module.configure_model()
    with torch.no_grad():
        old = _boolean_index_loss(module, batch)
        new = module.target_loss(batch)
        # a batch without the collator's positions derives them (the same loss)
        bare = module.target_loss({k: v for k, v in batch.items() if not k.startswith("target_")})
    assert new.item() == pytest.approx(old.item(), abs=1e-6)
    assert bare.item() == pytest.approx(old.item(), abs=1e-6)


def test_compiled_loss_traces_in_one_graph(processed_dir):
    """`model.compile` compiles `target_token_loss`: the decoder stack with segment ids (item-aware
    attention's hooks and masks), the target-position gather and the loss trace without a graph break."""
    from iamrec.lit_module import target_token_loss

    batch = _batch(processed_dir, n=4)
    module = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=None, compile=True)
    module.configure_model()
    plain = IAMRecModule(backbone="tiny", attention=ItemAttentionConfig("iam"), lora=None)
    plain.configure_model()
    assert list(module.state_dict()) == list(plain.state_dict())  # checkpoints unchanged
    torch._dynamo.reset()
    explained = torch._dynamo.explain(target_token_loss)(module.hf_model, batch)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
