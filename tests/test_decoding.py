"""Title trie and constrained beam search: literal trie checks, fast path == HF generate (reference)."""

import random

import pytest
import torch
from tiny_inputs import TITLE_WORDS
from tiny_inputs import item_prompts as _prompts

from iamrec.attention import apply_item_attention
from iamrec.decoding import TitleTrie, constrained_beam_search, prefix_table, reference_beam_search
from iamrec.model.loading import load_backbone
from iamrec.model.tiny import build_tiny_tokenizer

EOS = 2

# ---------------------------------------------------------------- trie, literal expectations


def _small_trie():
    # items 0..3: A, B, C (a token-level prefix of A and B), D (a duplicate of A)
    return TitleTrie.from_sequences([[5, 7, EOS], [5, 9, EOS], [5, EOS], [5, 7, EOS]], vocab_size=10)


def test_trie_csr_layout_matches_the_docstring_drawing():
    trie = _small_trie()
    assert trie.child_ptr.tolist() == [0, 1, 4, 4, 5, 6, 6, 6]
    assert trie.child_token.tolist() == [5, 2, 7, 9, 2, 2]
    assert trie.child_node.tolist() == [1, 2, 3, 4, 5, 6]
    assert trie.item_ptr.tolist() == [0, 0, 0, 1, 1, 1, 3, 4]
    assert trie.item_ids.tolist() == [2, 0, 3, 1]
    assert trie.max_depth == 3 and trie.eos_token_id == EOS and trie.num_items == 4


def test_trie_allowed_mask_advance_and_items():
    trie = _small_trie()
    mask = trie.allowed_mask(torch.tensor([0, 1, 3, 5, -1]))
    expected = torch.zeros(5, 10, dtype=torch.bool)
    expected[0, 5] = True  # root: only 5
    expected[1, [2, 7, 9]] = True  # after 5: EOS (item C), 7, 9
    expected[2, 2] = True  # after 5 7: EOS
    # row 3: a leaf (after EOS) and row 4: off the trie -> nothing allowed
    assert torch.equal(mask, expected)
    nodes = torch.tensor([0, 1, 1, 1, 3, 0, -1, 5])
    tokens = torch.tensor([5, 7, 9, 2, 2, 7, 5, 2])
    assert trie.advance(nodes, tokens).tolist() == [1, 3, 4, 2, 5, -1, -1, -1]
    assert trie.items_of([5, 7, EOS]) == [0, 3]  # the duplicate title maps to both items
    assert trie.items_of([5, EOS]) == [2]
    assert trie.items_of([5, 9, EOS]) == [1]
    assert trie.items_of([5, 7]) == [] and trie.items_of([7]) == []
    assert trie.is_leaf(torch.tensor([0, 1, 2, 5, 6, -1])).tolist() == [False, False, True, True, True, False]


def test_trie_rejects_bad_answers():
    with pytest.raises(ValueError, match="must end with the same EOS"):
        TitleTrie.from_sequences([[5, 2], [5, 3]], 10)
    with pytest.raises(ValueError, match="contains EOS"):
        TitleTrie.from_sequences([[5, 2, 7, 2]], 10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TitleTrie.from_sequences([[12, 2]], 10)


def test_allowed_mask_equals_prefix_dict_on_a_random_catalogue():
    answers = _catalogue()
    trie = TitleTrie.from_sequences(answers, 600)
    table = prefix_table(trie)
    prefixes = list(table)
    nodes = torch.tensor([trie.walk(p) for p in prefixes])
    mask = trie.allowed_mask(nodes)
    for row, prefix in enumerate(prefixes):
        assert mask[row].nonzero().view(-1).tolist() == table[prefix]


# ---------------------------------------------------------------- a small catalogue and batch


def _catalogue(n=40, seed=0):
    """40 answers from the tiny tokenizer: two duplicate titles and titles that are token-level prefixes."""
    tok = build_tiny_tokenizer()
    rng = random.Random(seed)
    titles = [" ".join(rng.sample(TITLE_WORDS, rng.randint(1, 3))) + f" ({1990 + i})" for i in range(n - 4)]
    titles += [titles[3], titles[7]]  # duplicates
    answers = [tok(t, add_special_tokens=False)["input_ids"] + [EOS] for t in titles]
    answers.append(answers[0][:-1] + [answers[5][0], answers[9][1]] + [EOS])  # answer 0 is a prefix of it
    answers.append(answers[2][:2] + [EOS])  # a prefix of answer 2
    return answers


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs single-threaded (`tiny_inputs.one_thread`)."""


@pytest.fixture(scope="module", params=["iam", "causal", "stacked"])
def model(request):
    torch.manual_seed(0)
    m = load_backbone("tiny").eval()
    with torch.no_grad():  # sharpen the random LM head so beams are well separated (no near-ties)
        m.lm_head.weight.mul_(5.0)
    return apply_item_attention(m, request.param)


@pytest.fixture(scope="module")
def trie():
    return TitleTrie.from_sequences(_catalogue(), 600)


# Scores are float32 sums of ~10 log-probs, about -60 here, where one float32 step is 3.8e-6 to 7.6e-6: the
# two paths run different (equally exact) kernels, so the last bits differ; allow 1e-5 plus 4 float32 steps.
_RTOL = 4 * torch.finfo(torch.float32).eps


def _assert_same(fast, ref):
    b, k = fast.scores.shape
    for i in range(b):
        assert [fast.answer(i, j) for j in range(k)] == [ref.answer(i, j) for j in range(k)]
        assert fast.items[i] == ref.items[i]
    assert torch.allclose(fast.scores, ref.scores, atol=1e-5, rtol=_RTOL)
    assert torch.equal(fast.item_ids, ref.item_ids)


def test_next_tokens_table_lists_children_or_eos():
    trie = _small_trie()
    tokens, valid = trie.next_tokens(torch.tensor([0, 1, 3, 5, -1]))
    assert tokens.shape == valid.shape == (5, 3)  # the widest node (1) has 3 children
    listed = [tokens[r][valid[r]].tolist() for r in range(5)]
    assert listed == [[5], [2, 7, 9], [2], [EOS], [EOS]]  # a leaf and node -1: EOS only, as with HF


# ---------------------------------------------------------------- fast path == HF generate


@pytest.mark.parametrize("num_beams", [2, 6])
def test_fast_beam_search_equals_hf_generate(model, trie, num_beams):
    ids, mask, seg = _prompts()
    fast = constrained_beam_search(model, ids, mask, seg, trie, num_beams)
    ref = reference_beam_search(model, ids, mask, seg, trie, num_beams)
    _assert_same(fast, ref)
    catalogue = set(trie.sequences)
    for i in range(ids.shape[0]):
        for j in range(num_beams):
            assert tuple(fast.answer(i, j)) in catalogue  # never a title outside the catalogue
            assert fast.items[i][j] and fast.item_ids[i, j] == fast.items[i][j][0]
        assert torch.all(fast.scores[i, :-1] >= fast.scores[i, 1:])  # best first


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_table_lookup_gives_the_edge_lookup_beams_bit_for_bit(model, trie, shared_prompt):
    """The padded next-token table (no host sync) and the edge list (the earlier path) score the same pairs
    by the same operations: identical beams and scores, over several batches."""
    for seed in (0, 1, 2):
        ids, mask, seg = _prompts(seed=seed)
        kw = dict(shared_prompt=shared_prompt)
        table = constrained_beam_search(model, ids, mask, seg, trie, 6, table=True, **kw)
        edges = constrained_beam_search(model, ids, mask, seg, trie, 6, table=False, **kw)
        assert torch.equal(table.sequences, edges.sequences) and torch.equal(table.scores, edges.scores)
        assert table.items == edges.items and table.steps == edges.steps


def test_duplicate_titles_return_all_their_items(model, trie):
    ids, mask, seg = _prompts(seed=1)
    fast = constrained_beam_search(model, ids, mask, seg, trie, 8)
    for i in range(3):
        for j in range(8):
            assert fast.items[i][j] == trie.items_of(fast.answer(i, j))
    dup = trie.items_of(trie.sequences[3])
    assert dup == [3, 36]


def test_length_penalty_and_never_early_stopping_also_match_hf(model, trie):
    ids, mask, seg = _prompts(seed=2)
    for lp, es in [(1.0, "never"), (0.0, False)]:
        kw = dict(length_penalty=lp, early_stopping=es)
        fast = constrained_beam_search(model, ids, mask, seg, trie, 4, **kw)
        ref = reference_beam_search(model, ids, mask, seg, trie, 4, **kw)
        _assert_same(fast, ref)


def test_batch_of_n_equals_n_batches_of_one(model, trie):
    ids, mask, seg = _prompts(seed=3)
    both = constrained_beam_search(model, ids, mask, seg, trie, 5)
    for i in range(3):
        start = int((mask[i] == 0).sum())  # strip this row's left padding
        one = constrained_beam_search(
            model, ids[i : i + 1, start:], mask[i : i + 1, start:], seg[i : i + 1, start:], trie, 5
        )
        assert [both.answer(i, j) for j in range(5)] == [one.answer(0, j) for j in range(5)]
        assert torch.allclose(both.scores[i], one.scores[0], atol=1e-5, rtol=_RTOL)


def test_dropping_settled_prompts_changes_nothing_but_cost(model, trie):
    ids, mask, seg = _prompts(seed=4)
    a = constrained_beam_search(model, ids, mask, seg, trie, 6, drop_settled=True)
    b = constrained_beam_search(model, ids, mask, seg, trie, 6, drop_settled=False)
    _assert_same(a, b)


def test_shared_prompt_cache_equals_per_beam_copies(model, trie):
    """The prompt's keys/values once per prompt (default) or copied to every beam: the same beams."""
    ids, mask, seg = _prompts(seed=6)
    shared = constrained_beam_search(model, ids, mask, seg, trie, 6, shared_prompt=True)
    copied = constrained_beam_search(model, ids, mask, seg, trie, 6, shared_prompt=False)
    _assert_same(shared, copied)
    plain = constrained_beam_search(model, ids, mask, None, trie, 3)  # no segment ids: stock attention
    _assert_same(plain, reference_beam_search(model, ids, mask, None, trie, 3))


def test_sparse_scores_and_sliced_head_change_nothing_but_cost(model, trie):
    """Scoring only the allowed tokens and the LM head in vocabulary slices: the same beams as HF's way."""
    ids, mask, seg = _prompts(seed=7)
    dense = constrained_beam_search(model, ids, mask, seg, trie, 6, sparse=False, head_chunk=None)
    _assert_same(constrained_beam_search(model, ids, mask, seg, trie, 6), dense)
    _assert_same(constrained_beam_search(model, ids, mask, seg, trie, 6, head_chunk=128), dense)


def test_sparse_top_equals_dense_top_with_placeholder_beams():
    from iamrec.decoding.scoring import NEG, dense_top, normaliser, sparse_top

    trie = TitleTrie.from_sequences(_catalogue(), 600)
    gen = torch.Generator().manual_seed(0)
    b, k = 3, 4
    leaves = trie.is_leaf(torch.arange(trie.num_nodes)).nonzero().view(-1)
    nodes = torch.randint(0, trie.num_nodes, (b, k), generator=gen)  # inner nodes and leaves
    nodes[0, 0], nodes[0, 1], nodes[1, 2] = 0, -1, leaves[0]  # the root, off the trie, a leaf
    logits = torch.randn(b * k, 600, generator=gen) * 3
    run_scores = -10 * torch.rand(b, k, generator=gen)
    run_scores[2, 1:] = NEG  # placeholder beams, as at the first step
    sparse_scores, sparse_idx = sparse_top(logits, normaliser(logits), nodes, run_scores, trie)
    dense_scores, dense_idx = dense_top(logits, nodes, run_scores, trie)
    assert torch.equal(sparse_idx, dense_idx)
    assert torch.allclose(sparse_scores, dense_scores, atol=1e-5)
    assert bool((dense_scores[2] < -1e8).any())  # the case really has placeholders in the top 2K


def test_shared_prompt_attention_equals_dense_attention():
    """One decode step of `shared_prompt_attention` == softmax over the concatenated keys with the dense mask."""
    from types import SimpleNamespace

    from iamrec.attention.masks import dense_mask
    from iamrec.decoding.shared_prompt import SharedPrompt, SharedPromptLayer, shared_prompt_attention
    from iamrec.segments import TARGET

    gen = torch.Generator().manual_seed(0)
    b, k, hk, g, p, n, d = 2, 3, 2, 2, 10, 4, 8  # prompt 1 has one padding position
    _, mask, seg = _prompts()
    mask, seg = mask[:b, -p:], seg[:b, -p:]
    pk, pv = torch.randn(2, b, hk, p, d, generator=gen)
    gk, gv = torch.randn(2, b * k, hk, n, d, generator=gen)
    q = torch.randn(b * k, hk * g, 1, d, generator=gen)
    cache = SimpleNamespace(layers=[SharedPromptLayer(pk, pv, capacity=n)] * 3)
    slots = {0: "intra", 1: "inter", 2: "causal"}
    for cv in (True, False):
        prompt = SharedPrompt(cache, k, mask, seg, slots, cv, n)
        for slot, kind in slots.items():
            out, _ = shared_prompt_attention(
                SimpleNamespace(layer_idx=slot), q, gk, gv, None, iam_prompt=prompt
            )
            keys = torch.cat([pk.repeat_interleave(k, 0), gk], 2).repeat_interleave(g, 1)  # (R, H, P+n, D)
            values = torch.cat([pv.repeat_interleave(k, 0), gv], 2).repeat_interleave(g, 1)
            full = torch.cat([seg, seg.new_full((b, n), TARGET)], 1).repeat_interleave(k, 0)
            allowed = dense_mask(kind, full, cv, q_offset=p + n - 1)  # (R, 1, 1, P+n)
            allowed &= torch.cat([mask, mask.new_ones(b, n)], 1).bool().repeat_interleave(k, 0)[:, None, None]
            expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
            assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6), (kind, cv)


def test_more_beams_than_answers_still_equals_hf(model):
    """Fewer catalogue answers than beams: HF fills the rest with placeholder beams; so do we."""
    small = TitleTrie.from_sequences(_catalogue()[:3], 600)
    ids, mask, seg = _prompts(seed=5)
    fast = constrained_beam_search(model, ids, mask, seg, small, 5)
    ref = reference_beam_search(model, ids, mask, seg, small, 5)
    _assert_same(fast, ref)
    assert (fast.scores[:, :3] > -1e8).all() and (fast.scores[:, 3:] < -1e8).all()


def test_trie_vocabulary_must_match_the_model(model):
    with pytest.raises(ValueError, match="vocabulary of 10 tokens"):
        constrained_beam_search(model, *_prompts(), _small_trie(), 2)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_a_schedule_stacking_only_some_layers_equals_hf(trie, shared_prompt):
    """Stacked passes in some layers only leave cache slots no layer writes (pass p of layer i uses slot
    i + p * N); the fast path keeps them empty and still returns HF's beams."""
    torch.manual_seed(0)
    m = load_backbone("tiny").eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(5.0)
    n = m.config.num_hidden_layers
    schedule = ["intra+inter" if i == 1 else ("inter" if i % 2 else "intra") for i in range(n)]
    model = apply_item_attention(m, schedule)
    ids, mask, seg = _prompts()
    fast = constrained_beam_search(model, ids, mask, seg, trie, 4, shared_prompt=shared_prompt)
    _assert_same(fast, reference_beam_search(model, ids, mask, seg, trie, 4))


def test_search_bookkeeping_step_traces_in_one_graph():
    """Steps a-f of a decode step with the table lookup (`iamrec.decoding.steps`) read nothing from the
    device: torch.compile traces them in one graph, no break."""
    from iamrec.decoding import steps
    from iamrec.decoding.scoring import normaliser

    trie, (b, k, t) = _small_trie(), (2, 3, 3)
    state = steps.BeamState.start(trie, k, t, None, None, None, torch.zeros(b * k, 1, dtype=torch.long))
    logits = torch.randn(b * k, 10)

    def step(state, logits, norm):
        cand = steps.top_candidates(state, logits, norm, trie, 0, t, True, True)
        steps.keep_running(state, cand)
        steps.update_finished(state, cand, 0, 0.0, True)
        return steps.check_early_stop(state, cand, 0, t, 0.0, True), steps.settled(state, True)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(state, logits, normaliser(logits))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]


def test_model_decode_step_traces_in_one_graph(trie):
    """g. One decode step of the model (cache reorder, item-aware attention over the shared prompt, LM
    head) traces in one graph too."""
    from iamrec.decoding import steps
    from iamrec.decoding.beam import _ModelRunner

    torch.manual_seed(0)
    model = apply_item_attention(load_backbone("tiny").eval(), "iam")
    ids, mask, seg = _prompts()
    runner, t = _ModelRunner(model, 3, True, True, None), trie.max_depth
    with torch.no_grad():
        state, logits, norm = runner.prefill(ids, mask, seg, trie, t)
        steps.keep_running(state, steps.top_candidates(state, logits, norm, trie, 0, t, True, True))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(runner.step)(state, None, 0)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
