"""BlockManager: who owns which KV block, and which blocks hold a known prefix.

Block 0 is the null block: zero-filled, never allocated, used to pad block tables. A block's life:
free → allocated to a sequence (ref 1) → shared by later sequences whose prompt starts with the
same tokens (ref n) → freed when its last owner finishes; a freed block keeps its hash and can
still be hit until the allocator hands it out again (then the hash is forgotten).

A block is registered under its hash only once its KV is fully computed (`commit`), so a sequence
can never hit a block whose contents another sequence's later prefill chunk has not written yet.
Hashes chain over the previous block's hash, the block's token ids and the content hashes of the
images whose placeholders fall in it (placeholder ids alone say nothing about the picture).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from decoders.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(prev: bytes | None, token_ids: tuple[int, ...], image_hashes: tuple[str, ...]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"")
    h.update(",".join(map(str, token_ids)).encode())
    h.update("|".join(image_hashes).encode())
    return h.digest()


def text_prefix_hashes(token_ids: list[int], block_size: int, image_token_id: int | None) -> list[bytes]:
    """The chained hashes of a prompt's leading full blocks up to its first image placeholder —
    what an engine's prefix cache would register for them, computed where no engine is (the
    router). Blocks holding image tokens also need the pictures' hashes; they are left out."""
    hashes: list[bytes] = []
    for lo in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[lo:lo + block_size])
        if image_token_id is not None and image_token_id in tokens:
            break
        hashes.append(block_hash(hashes[-1] if hashes else None, tokens, ()))
    return hashes


@dataclass(slots=True)
class BlockManager:
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    blocks: list[Block] = field(init=False)
    free_ids: dict[int, None] = field(init=False)        # insertion-ordered set: oldest freed first
    hash_to_block: dict[bytes, int] = field(init=False)
    prefix_hits: int = 0                                   # blocks served from the prefix cache
    prefix_misses: int = 0                                 # full prompt blocks looked up, not cached

    def __post_init__(self):
        if self.num_blocks < 2:
            raise ValueError("need at least 2 blocks (block 0 is reserved)")
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_ids = dict.fromkeys(range(1, self.num_blocks))
        self.hash_to_block = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission ---------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Chained hashes of the sequence's first full blocks, memoised on the sequence (tokens
        are append-only). Shorter than asked past an image without a content hash: such blocks
        can't be identified, so the chain stops there."""
        hashes = seq.block_hashes
        spans = seq.image_spans() if seq.images and len(hashes) < num_full_blocks else []
        for i in range(len(hashes), num_full_blocks):
            lo, hi = i * self.block_size, (i + 1) * self.block_size - 1
            imgs = tuple(h for first, last, h in spans if first <= hi and last >= lo)
            if any(not h for h in imgs):
                break
            tokens = tuple(seq.token_ids[lo:hi + 1])
            hashes.append(block_hash(hashes[-1] if hashes else None, tokens, imgs))
        return hashes[:num_full_blocks]

    def _block_tokens(self, seq: Sequence, i: int) -> tuple[int, ...]:
        return tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hits = []
        # leave at least one token to compute: its logits give the next token
        for i, h in enumerate(self._hashes(seq, (len(seq) - 1) // self.block_size)):
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != self._block_tokens(seq, i):
                break
            hits.append(bid)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reclaimed = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(len(seq)) - len(hits)
        return need <= self.num_free_blocks - reclaimed

    def allocate(self, seq: Sequence) -> None:
        """Give the sequence blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self._cached_prefix(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_ids[bid]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.num_committed_blocks = len(hits)
        self.prefix_hits += len(hits)
        if self.enable_prefix_caching:
            self.prefix_misses += (len(seq) - 1) // self.block_size - len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self.ensure_slots(seq, len(seq))

    # ---- growth --------------------------------------------------------------------------------
    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_free())

    def _take_free(self) -> int:
        bid = next(iter(self.free_ids))
        del self.free_ids[bid]
        block = self.blocks[bid]
        if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return bid

    # ---- after a step ---------------------------------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Register every fully computed block of the sequence under its hash."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes(seq, seq.num_computed_tokens // self.block_size)
        for i in range(seq.num_committed_blocks, len(hashes)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = hashes[i], self._block_tokens(seq, i)
                self.hash_to_block.setdefault(hashes[i], block.block_id)
        seq.num_committed_blocks = len(hashes)

    def free(self, seq: Sequence) -> None:
        # reversed: a sequence's tail blocks are the least likely to be shared, so reuse them first
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_committed_blocks = 0
