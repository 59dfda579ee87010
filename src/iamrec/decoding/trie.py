"""A trie of catalogue answers stored as flat tensors, queried for many beams at once.

Notation: ``V`` vocabulary size, ``N`` trie nodes (node 0 is the root), ``E = N - 1`` edges, ``M`` the
number of beams queried at once (batch x beams, flattened), ``I`` catalogue items.

Each catalogue item's answer is its title's tokens as they follow the response header, plus EOS: the
training labels' answer ids, ``PromptEncoder.answer_ids`` (``iamrec.data.encode_answers``), which the
datamodule hands to `TitleTrie.from_sequences` as ``answer_token_ids``. The trie holds every answer as a
path from the root; the node reached after the EOS is a *leaf* that lists the items with exactly that
answer (duplicate titles list several items).
With EOS = 2 and answers ``A = [5, 7, 2]``, ``B = [5, 9, 2]``, ``C = [5, 2]``, ``D = [5, 7, 2]``
(item ids 0..3; ``D`` duplicates ``A``, ``C`` is a token-level prefix of both)::

    root(0) ──5──▶ (1) ──2──▶ [2]  items {2}        C
                    ├──7──▶ (3) ──2──▶ [5]  items {0, 3}   A, D
                    └──9──▶ (4) ──2──▶ [6]  items {1}      B

Storage (CSR: the children of node ``n`` are the edges ``child_ptr[n] : child_ptr[n + 1]``, sorted by
token; nodes are numbered breadth-first so the edge list is grouped by parent)::

    child_ptr   (N + 1,)  [0, 1, 4, 4, 5, 6, 6, 6]
    child_token (E,)      [5, 2, 7, 9, 2, 2]        sorted within each node
    child_node  (E,)      [1, 2, 3, 4, 5, 6]
    edge_key    (E,)      parent * V + token        globally sorted -> `advance` is one searchsorted
    item_ptr    (N + 1,)  [0, 0, 0, 1, 1, 1, 3, 4]  CSR of the items ending at each node (leaves only)
    item_ids    (I,)      [2, 0, 3, 1]

`allowed_edges`, `allowed_mask` and `advance` take a whole ``(M,)`` vector of nodes and never loop in Python over beams.
`allowed_edges` returns as many pairs as the nodes have children, a size the host reads from the device;
`next_tokens` returns a fixed ``(M, C)`` block from the padded table below instead (no host sync)::

    next_table  (N + 1, C) int32  row n + 1: node n's child tokens, then -1; a node without children (a
                                  leaf) and row 0 (node -1) hold only EOS: the one continuation HF's
                                  ``prefix_allowed_tokens_fn`` leaves such a beam. C = most children of a
                                  node (the root's, ~hundreds for a real catalogue: N * C * 4 bytes)
Node ``-1`` stands for "not on any catalogue path": it has no children and advancing from it stays -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class TitleTrie:
    """Trie of answer token sequences (each ending with EOS); see the module docstring for the layout.

    Build it with `TitleTrie.from_sequences`; index ``i`` of the input is item id ``i``.
    """

    def __init__(
        self,
        child_ptr: torch.Tensor,
        child_token: torch.Tensor,
        child_node: torch.Tensor,
        item_ptr: torch.Tensor,
        item_ids: torch.Tensor,
        vocab_size: int,
        eos_token_id: int,
        max_depth: int,
        sequences: list[tuple[int, ...]],
    ):
        self.child_ptr = child_ptr
        self.child_token = child_token
        self.child_node = child_node
        self.item_ptr = item_ptr
        self.item_ids = item_ids
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.max_depth = max_depth  # longest answer, EOS included
        self.sequences = sequences  # item id -> its answer tokens (EOS included)
        parents = torch.repeat_interleave(torch.arange(self.num_nodes), child_ptr.diff())
        self.edge_key = parents * vocab_size + child_token  # (E,) sorted, see module docstring
        self.next_table = self._next_table()  # (N + 1, C), see module docstring
        self._items_by_node: list[list[int]] | None = None
        self._device = child_ptr.device

    def _next_table(self) -> torch.Tensor:
        counts = self.child_ptr.diff()  # (N,)
        width = max(int(counts.max()), 1) if counts.numel() else 1
        table = torch.full((self.num_nodes + 1, width), -1, dtype=torch.int32, device=self.child_ptr.device)
        parents = torch.repeat_interleave(torch.arange(self.num_nodes, device=counts.device), counts)
        rank = torch.arange(parents.numel(), device=counts.device) - self.child_ptr[parents]
        table[parents + 1, rank] = self.child_token.to(torch.int32)
        dead = torch.cat([torch.zeros(1, dtype=torch.long), (counts == 0).nonzero().view(-1) + 1])
        table[dead, 0] = self.eos_token_id
        return table

    # ------------------------------------------------------------------------------------ building
    @classmethod
    def from_sequences(cls, answer_token_ids: Sequence[Sequence[int]], vocab_size: int) -> TitleTrie:
        """Build the trie; ``answer_token_ids[i]`` is item ``i``'s answer, its last token the EOS.

        All answers must end with the same EOS token and contain it nowhere else (a title with an EOS
        inside would end early and be unreachable).
        """
        if len(answer_token_ids) == 0:
            raise ValueError("TitleTrie needs at least one answer; the catalogue is empty.")
        seqs = [tuple(int(t) for t in s) for s in answer_token_ids]
        eos = seqs[0][-1] if seqs[0] else None
        for i, s in enumerate(seqs):
            if not s or s[-1] != eos:
                raise ValueError(
                    f"answer of item {i} is {list(s)}; every answer must end with the same EOS token "
                    f"({eos}) — build answers with iamrec.data.encode_answers (PromptEncoder.answer_ids)."
                )
            if eos in s[:-1]:
                raise ValueError(f"answer of item {i} contains EOS ({eos}) before its end: {list(s)}.")
            bad = [t for t in s if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"answer of item {i} has token {bad[0]} outside the vocabulary [0, {vocab_size})."
                )

        # Breadth-first numbering keeps the CSR edge list grouped by parent and sorted by (parent, token).
        children: list[dict[int, int]] = [{}]
        items: dict[int, list[int]] = {}
        for item, s in enumerate(seqs):  # a temporary dict trie, once per catalogue
            node = 0
            for tok in s:
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                node = nxt
            items.setdefault(node, []).append(item)
        order, queue = [0], [0]
        while queue:
            nxt_queue = []
            for node in queue:
                for tok in sorted(children[node]):
                    nxt_queue.append(children[node][tok])
            order += nxt_queue
            queue = nxt_queue
        new_id = {old: new for new, old in enumerate(order)}
        ptr, tokens, nodes, iptr, iids = [0], [], [], [0], []
        for old in order:
            for tok in sorted(children[old]):
                tokens.append(tok)
                nodes.append(new_id[children[old][tok]])
            ptr.append(len(tokens))
            iids += items.get(old, [])
            iptr.append(len(iids))
        long = torch.long
        return cls(
            child_ptr=torch.tensor(ptr, dtype=long),
            child_token=torch.tensor(tokens, dtype=long),
            child_node=torch.tensor(nodes, dtype=long),
            item_ptr=torch.tensor(iptr, dtype=long),
            item_ids=torch.tensor(iids, dtype=long),
            vocab_size=vocab_size,
            eos_token_id=eos,
            max_depth=max(len(s) for s in seqs),
            sequences=seqs,
        )

    def to(self, device: torch.device | str) -> TitleTrie:
        """Move the tensors (in place) to `device`; returns self."""
        for name in (
            "child_ptr",
            "child_token",
            "child_node",
            "item_ptr",
            "item_ids",
            "edge_key",
            "next_table",
        ):
            setattr(self, name, getattr(self, name).to(device))
        self._device = torch.device(device)
        return self

    # ------------------------------------------------------------------------------------ queries
    @property
    def num_nodes(self) -> int:
        return self.child_ptr.numel() - 1

    @property
    def num_items(self) -> int:
        return len(self.sequences)

    def root(self, *shape: int) -> torch.Tensor:
        """A tensor of root nodes (0) of `shape`."""
        return torch.zeros(shape, dtype=torch.long, device=self._device)

    def allowed_edges(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (row, token) pair allowed from ``nodes`` ``(M,)``, as two ``(S,)`` vectors.

        Sorted by row, then token (the order of ``row * V + token``). Leaves and node -1 give no pair.
        """
        nodes = nodes.reshape(-1)
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        start = self.child_ptr[safe]  # (M,)
        counts = torch.where(valid, self.child_ptr[safe + 1] - start, 0)  # (M,)
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), counts)  # (S,)
        # edge index of each (row, child): the row's first edge + the child's rank within the row
        first = torch.cumsum(counts, 0) - counts  # (M,) offset of each row in the flat list
        rank = torch.arange(rows.numel(), device=nodes.device) - first[rows]
        return rows, self.child_token[start[rows] + rank]

    def next_tokens(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, valid)``, both ``(M, C)``: the tokens a beam at each of ``nodes`` ``(M,)`` may continue
        with, padded to the table's width (``valid`` False on the padding, whose token reads 0).

        Its trie children; a leaf or node -1 only EOS (what `scoring.continuations` gives, as a fixed block:
        no host sync).
        """
        rows = self.next_table.index_select(0, nodes.reshape(-1) + 1).long()  # node -1 -> row 0
        valid = rows >= 0
        return rows.clamp(min=0), valid

    def allowed_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """``(M, V)`` bool: which tokens continue a catalogue answer from each of ``nodes`` ``(M,)``.

        Leaves and node -1 have no allowed token (all-False rows).
        """
        rows, tokens = self.allowed_edges(nodes)
        mask = torch.zeros(nodes.numel(), self.vocab_size, dtype=torch.bool, device=nodes.device)
        mask[rows, tokens] = True
        return mask

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The node reached from each of ``nodes`` by the matching token; -1 where that is no edge."""
        key = nodes * self.vocab_size + tokens
        # (every answer has at least its EOS, so there is at least one edge)
        idx = torch.searchsorted(self.edge_key, key).clamp(max=self.edge_key.numel() - 1)
        found = (nodes >= 0) & (self.edge_key[idx] == key)
        return torch.where(found, self.child_node[idx], -1)

    def walk(self, tokens: Sequence[int]) -> int:
        """The node reached from the root by `tokens` (-1 if they leave the trie)."""
        node = torch.zeros(1, dtype=torch.long, device=self._device)
        for tok in tokens:
            node = self.advance(node, torch.tensor([int(tok)], device=self._device))
        return int(node.item())

    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        """Bool tensor: which nodes end an answer (hold items)."""
        safe = nodes.clamp(min=0)
        return (nodes >= 0) & (self.item_ptr[safe + 1] > self.item_ptr[safe])

    def items_by_node(self) -> list[list[int]]:
        """Per node, the item ids whose answer ends there (read from the device once, then kept)."""
        if self._items_by_node is None:
            ptr, ids = self.item_ptr.tolist(), self.item_ids.tolist()
            self._items_by_node = [ids[ptr[n] : ptr[n + 1]] for n in range(self.num_nodes)]
        return self._items_by_node

    def items_at(self, node: int) -> list[int]:
        """Item ids whose answer ends exactly at `node` (empty for inner nodes and -1)."""
        if node < 0:
            return []
        return self.item_ids[self.item_ptr[node] : self.item_ptr[node + 1]].tolist()

    def items_of(self, tokens: Sequence[int]) -> list[int]:
        """Item ids whose answer is exactly `tokens` (EOS included); empty if none."""
        return self.items_at(self.walk(tokens))
