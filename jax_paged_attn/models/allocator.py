"""The KV-cache block allocator, with prefix caching.

Blocks are reference-counted: a block is in use while some request's block table holds it.
A prompt block that is full is registered under the hash of its token ids chained with the
hash of everything before it, so a later request whose prompt starts with the same tokens
takes the same blocks (its block table points at them; nothing is copied or recomputed).
When the last request using a registered block finishes, the block stays cached but becomes
evictable (least recently used first); blocks that were never registered go straight back to
the free list. Allocation takes free blocks first, then evicts.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def block_hashes(tokens, block_size: int) -> list[bytes]:
    """Chained hashes of the full blocks of ``tokens`` (a trailing partial block has none)."""
    out, parent = [], b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = np.asarray(tokens[start : start + block_size], np.int64).tobytes()
        parent = hashlib.sha256(parent + chunk).digest()
        out.append(parent)
    return out


class OutOfBlocksError(RuntimeError):
    pass


class BlockAllocator:
    """Hands out cache blocks ``0 .. num_blocks-1``; see the module docstring."""

    def __init__(self, num_blocks: int, *, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = np.zeros(num_blocks, np.int32)
        self.free = collections.deque(range(num_blocks))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.cached: dict[bytes, int] = {}  # hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> hash

    @property
    def num_available(self) -> int:
        """Blocks an allocation can take now (free + evictable)."""
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached[self.hash_of.pop(block)]
        else:
            raise OutOfBlocksError(f"all {self.num_blocks} KV-cache blocks are in use")
        self.refs[block] = 1
        return block

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of ``hashes``; each gains a reference
        (release them like allocated blocks)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            self.evictable.pop(block, None)
            self.refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, h: bytes) -> None:
        """Publishes a full, written prompt block under its hash (the first block with a hash
        stays the cached one; a duplicate is simply not published)."""
        if self.prefix_caching and h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h

    def release(self, blocks) -> None:
        for block in blocks:
            if self.refs[block] <= 0:
                raise RuntimeError(f"block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None  # most recently used at the end
                else:
                    self.free.append(block)
