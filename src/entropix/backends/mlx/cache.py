"""A KV cache for ragged batches in MLX: left-padded rows that share one write position.

Every row writes its next token at the same slot (`offset`), so a decode step is one slice
update per layer; row b owns slots [starts[b], offset) and what lies before starts[b] is
padding that no query attends to. RoPE positions count from each row's own start
(`positions`), so padding never shifts a row's numbers. Rows joined from another prefill
are aligned by left-padding whichever side is shorter.
"""

from __future__ import annotations

import mlx.core as mx

_STEP = 256  # slots are allocated in blocks of this many


class RowCache:
    def __init__(self, n_layers: int, batch: int, starts: list[int] | None = None) -> None:
        self.keys: list[mx.array | None] = [None] * n_layers  # [B, Hkv, capacity, D] per layer
        self.values: list[mx.array | None] = [None] * n_layers
        self.offset = 0  # slots written, the same for every row
        self.starts: list[int] = list(starts) if starts is not None else [0] * batch
        self._dev: dict[str, mx.array] = {}  # device copies of per-row data, rebuilt after a change

    @property
    def batch(self) -> int:
        return len(self.starts)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    # -- per-row views --------------------------------------------------------------
    def positions(self) -> mx.array:
        """[B] RoPE position of each row's next token (negative on padding rows' pad slots)."""
        if "pos" not in self._dev:
            self._dev["pos"] = mx.array([self.offset - s for s in self.starts], dtype=mx.int32)
        return self._dev["pos"]

    def valid(self, S: int) -> mx.array:
        """[B, S] bool: which of the first S slots hold a row's own keys."""
        key = ("valid", S)
        if key not in self._dev:
            self._dev[key] = mx.arange(S)[None, :] >= mx.array(self.starts, dtype=mx.int32)[:, None]
        return self._dev[key]

    def mask(self, T: int) -> mx.array | None:
        """Attention mask [B, 1, T, S] for T new tokens (None when no row is padded and T == 1)."""
        S = self.offset + T
        if T == 1 and not any(self.starts):
            return None
        key = mx.arange(S)[None, None, :]
        q_slot = (self.offset + mx.arange(T))[None, :, None]  # [1, T, 1]
        starts = mx.array(self.starts, dtype=mx.int32)[:, None, None]
        m = (key >= starts) & (key <= q_slot)
        # A padding query has no valid key; letting it see its own slot keeps its softmax
        # finite (a NaN there would reach real rows through 0 * NaN).
        m = m | (key == q_slot)
        return m[:, None]

    # -- writes ---------------------------------------------------------------------
    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v [B, Hkv, T, D] at slots [offset, offset + T); return all keys and values
        so far. `advance` moves the offset on after the last layer."""
        end = self.offset + k.shape[2]
        old = self.keys[layer]
        if old is None or end > old.shape[2]:
            cap = (end + _STEP - 1) // _STEP * _STEP
            B, Hkv, _, D = k.shape
            grow_k = mx.zeros((B, Hkv, cap - (0 if old is None else self.offset), D), k.dtype)
            grow_v = mx.zeros((B, Hkv, grow_k.shape[2], v.shape[3]), v.dtype)
            if old is None:
                self.keys[layer], self.values[layer] = grow_k, grow_v
            else:
                self.keys[layer] = mx.concatenate([old[:, :, :self.offset], grow_k], axis=2)
                self.values[layer] = mx.concatenate([self.values[layer][:, :, :self.offset], grow_v], axis=2)
        self.keys[layer][:, :, self.offset:end] = k
        self.values[layer][:, :, self.offset:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.offset += T
        self._dev = {}

    # -- row surgery ------------------------------------------------------------------
    def select(self, rows: list[int]) -> None:
        """Keep (reorder, repeat) the given rows."""
        if rows != list(range(self.batch)):
            idx = mx.array(rows, dtype=mx.int32)
            self.keys = [None if k is None else k[idx] for k in self.keys]
            self.values = [None if v is None else v[idx] for v in self.values]
        self.starts = [self.starts[r] for r in rows]
        self._trim_padding()
        self._dev = {}

    def join(self, other: "RowCache") -> None:
        """Append other's rows after this cache's, aligned on the write position."""
        if self.batch == 0:
            self.keys, self.values, self.offset, self.starts = other.keys, other.values, other.offset, other.starts
            self._dev = {}
            return
        a, b = self._left_padded(max(self.offset, other.offset)), other._left_padded(max(self.offset, other.offset))
        self.keys = [mx.concatenate([x, y]) for x, y in zip(a[0], b[0])]
        self.values = [mx.concatenate([x, y]) for x, y in zip(a[1], b[1])]
        shift_a, shift_b = max(0, other.offset - self.offset), max(0, self.offset - other.offset)
        self.starts = [s + shift_a for s in self.starts] + [s + shift_b for s in other.starts]
        self.offset = max(self.offset, other.offset)
        self._dev = {}

    def _left_padded(self, length: int) -> tuple[list[mx.array], list[mx.array]]:
        """Keys and values trimmed to the written slots and padded on the left to `length`."""
        pad = length - self.offset

        def one(x: mx.array) -> mx.array:
            x = x[:, :, :self.offset]
            if pad == 0:
                return x
            return mx.concatenate([mx.zeros((x.shape[0], x.shape[1], pad, x.shape[3]), x.dtype), x], axis=2)

        return [one(k) for k in self.keys], [one(v) for v in self.values]

    def _trim_padding(self) -> None:
        """Drop the slots that every remaining row has as padding (after finishes and forks)."""
        cut = min(self.starts) if self.starts else 0
        if cut < _STEP:  # trimming copies every layer: only worth it for a block or more
            return
        self.keys = [k[:, :, cut:] for k in self.keys]
        self.values = [v[:, :, cut:] for v in self.values]
        self.starts = [s - cut for s in self.starts]
        self.offset -= cut
