"""The LightningModule: target-only loss, learning on one batch, checkpoint contents."""

from __future__ import annotations

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
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    fresh = IAMRecModule(backbone="tiny", lora=LoraConfig())
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
    module.model.eval()  # as `from_pretrained` returns a real backbone
    trainer = L.Trainer(
        max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert modes == {"train": {True}, "val": {False}}
