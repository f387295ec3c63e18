"""A small KV cache with per-row lengths.

Rows may hold different amounts of text: row b owns slots [starts[b], lengths[b]).
Slots before starts[b] are left padding and are never attended to. Host-side copies
of the lengths are kept in Python so that no step has to ask the device for them.
"""

from __future__ import annotations

import copy

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
                 capacity: int, device, dtype) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, Hkv, S, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths: list[int] = [0] * batch  # next free slot per row
        self.starts: list[int] = [0] * batch  # first valid slot per row
        self._dev: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- shape -------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def max_length(self) -> int:
        return max(self.lengths) if self.lengths else 0

    def device_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts, lengths) as device tensors, rebuilt only after a change."""
        if self._dev is None:
            dev = self.k.device
            self._dev = (torch.tensor(self.starts, device=dev), torch.tensor(self.lengths, device=dev))
        return self._dev

    def ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        new_cap = (new_cap + 255) // 256 * 256
        pad = new_cap - self.capacity
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, pad))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, pad))

    def attention_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask [B, 1, T, S] (S = longest row + T) and RoPE positions [B, T] for T new tokens."""
        starts, lengths = self.device_lengths()
        S = self.max_length() + T
        dev = self.k.device
        # Positions count from each row's first valid slot, so padding never shifts RoPE.
        pos = (lengths - starts)[:, None] + torch.arange(T, device=dev)  # [B, T]
        q_slot = lengths[:, None] + torch.arange(T, device=dev)  # [B, T]
        key = torch.arange(S, device=dev)
        mask = (key[None, None, :] >= starts[:, None, None]) & (key[None, None, :] <= q_slot[:, :, None])
        # A padding query has no valid key; letting it see its own slot keeps its
        # softmax finite (a NaN there would reach real rows through 0 * NaN).
        mask = mask | (key[None, None, :] == q_slot[:, :, None])
        return mask[:, None], pos.clamp(min=0)

    # -- writes ------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, Hkv, T, D] at each row's next T slots (lengths move on in advance())."""
        T = k.shape[2]
        L0 = self.lengths[0]
        if all(n == L0 for n in self.lengths):
            self.k[layer, :, :, L0:L0 + T] = k
            self.v[layer, :, :, L0:L0 + T] = v
        else:
            starts, lengths = self.device_lengths()
            slots = lengths[:, None] + torch.arange(T, device=k.device)  # [B, T]
            rows = torch.arange(self.batch, device=k.device)[:, None]  # [B, 1]
            # advanced indices on dims 0 and 2 put [B, T] first: values must be [B, T, Hkv, D]
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def write_layers(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new token's k, v [L, B, Hkv, 1, D] of every layer at each row's next slot."""
        L0 = self.lengths[0]
        if all(n == L0 for n in self.lengths):
            self.k[:, :, :, L0:L0 + 1] = k
            self.v[:, :, :, L0:L0 + 1] = v
        else:
            slots = self.device_lengths()[1]
            rows = torch.arange(self.batch, device=k.device)
            # advanced indices on dims 1 and 3 put [B] first: values must be [B, L, Hkv, D]
            self.k[:, rows, :, slots] = k[:, :, :, 0].transpose(0, 1)
            self.v[:, rows, :, slots] = v[:, :, :, 0].transpose(0, 1)

    def advance(self, T: int) -> None:
        self.lengths = [n + T for n in self.lengths]
        self._dev = None

    # -- row surgery ---------------------------------------------------------
    def select(self, rows: list[int]) -> None:
        """Keep (and reorder, or repeat) the given rows."""
        idx = torch.tensor(rows, device=self.k.device, dtype=torch.long)
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)
        self.lengths = [self.lengths[r] for r in rows]
        self.starts = [self.starts[r] for r in rows]
        self._dev = None

    def append_rows_from(self, other: "KVCache", rows: list[int]) -> None:
        """Append copies of other's rows (another cache, or this one) to this cache."""
        if rows == list(range(other.batch)):  # all of them, in order: no gather copy
            k_new, v_new = other.k, other.v
        else:
            idx = torch.tensor(rows, device=other.k.device, dtype=torch.long)
            k_new, v_new = other.k.index_select(1, idx), other.v.index_select(1, idx)
        S = max(self.capacity, other.capacity)
        self.ensure_capacity(S)
        if k_new.shape[3] < S:
            pad = S - k_new.shape[3]
            k_new = torch.nn.functional.pad(k_new, (0, 0, 0, pad))
            v_new = torch.nn.functional.pad(v_new, (0, 0, 0, pad))
        lengths = [other.lengths[r] for r in rows]
        starts = [other.starts[r] for r in rows]
        self.k = torch.cat([self.k, k_new], dim=1)
        self.v = torch.cat([self.v, v_new], dim=1)
        self.lengths = self.lengths + lengths
        self.starts = self.starts + starts
        self._dev = None

    def head(self, top: int) -> "KVCache":
        """Rows [0, top) as a cache of the same kind over this one's tensors (writes land in
        them), with its own copies of the lengths."""
        c = copy.copy(self)
        c.k, c.v = self.k[:, :top], self.v[:, :top]
        c.lengths, c.starts, c._dev = self.lengths[:top], self.starts[:top], None
        return c


class SlotCache:
    """Rows kept in slots of one preallocated cache, with a free list.

    A row that leaves gives its slot back and costs no copy of the other rows; a new row takes
    the lowest free slot, so the used slots stay packed at the bottom. The model runs over slots
    [0, top) through a view (`view()`): a free slot inside that range is a dummy row of length 0
    whose output is ignored. Only growth (more slots, a longer capacity) copies, and it doubles.
    """

    def __init__(self, make: "callable", rows: int, capacity: int, full: KVCache | None = None) -> None:
        self._make = make  # (rows, capacity) -> KVCache
        self.full = make(rows, capacity) if full is None else full
        self.used = [full is not None] * rows

    @classmethod
    def adopt(cls, make: "callable", cache: KVCache) -> "SlotCache":
        """Slots over a prefill's own cache, every row used: the first rows of a batch take their
        prefill's tensors instead of zeroing a new cache and copying into it."""
        return cls(make, cache.batch, cache.capacity, full=cache)

    @property
    def top(self) -> int:
        """One past the highest used slot."""
        return max((i + 1 for i, u in enumerate(self.used) if u), default=0)

    @property
    def capacity(self) -> int:
        return self.full.capacity

    def alloc(self) -> int:
        for i, u in enumerate(self.used):
            if not u:
                self.used[i] = True
                return i
        old = self.full  # all taken: double the slots (the one copy of everything, amortised)
        n = old.batch
        self.full = self._make(2 * n, old.capacity)
        self.full.k[:, :n], self.full.v[:, :n] = old.k, old.v
        self.full.lengths[:n], self.full.starts[:n] = old.lengths, old.starts
        self.full._dev = None
        self.used += [True] + [False] * (n - 1)
        return n

    def release(self, slot: int) -> None:
        self.used[slot] = False
        self.full.lengths[slot] = self.full.starts[slot] = 0
        self.full._dev = None

    def ensure_capacity(self, needed: int) -> None:
        self.full.ensure_capacity(needed)

    def put(self, slot: int, src: KVCache, row: int) -> None:
        """Copy row `row` of another cache into a slot (a new row's own prefill)."""
        n = src.lengths[row]
        self.ensure_capacity(n + 1)
        self.full.k[:, slot, :, :n] = src.k[:, row, :, :n]
        self.full.v[:, slot, :, :n] = src.v[:, row, :, :n]
        self.full.lengths[slot], self.full.starts[slot] = n, src.starts[row]
        self.full._dev = None

    def fork(self, dst: int, src: int) -> None:
        """A copy of one row's own cache in another slot (a branching fork)."""
        n, s = self.full.lengths[src], self.full.starts[src]
        self.full.k[:, dst, :, s:n] = self.full.k[:, src, :, s:n]
        self.full.v[:, dst, :, s:n] = self.full.v[:, src, :, s:n]
        self.full.lengths[dst], self.full.starts[dst] = n, s
        self.full._dev = None

    def view(self, new_tokens: int) -> KVCache:
        """Slots [0, top) as one cache with room for `new_tokens` more, sharing this one's tensors."""
        top = self.top
        self.ensure_capacity(max(self.full.lengths[:top], default=0) + new_tokens)
        return self.full.head(top)  # a LatentCache (MLA) stays one

    def settle(self, view: KVCache) -> None:
        """Take the lengths a forward pass moved on; free slots stay empty."""
        for i, n in enumerate(view.lengths):
            self.full.lengths[i] = n if self.used[i] else 0
        self.full._dev = None
