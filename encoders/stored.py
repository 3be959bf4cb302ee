"""Image embeddings that travel E→P through the Ray object store instead of through the ingress.

An encode replica returns its embeddings to the orchestrator, which hands them to a prefill
replica. Small ones ride inline in those two calls (cheaper than a store round trip). Past
`inline_limit_bytes` the encode replica `ray.put`s them and returns a `StoredEmbeddings` — a
handle of a few bytes — so the ingress never deserialises or re-sends the tensors: the prefill
replica fetches them straight from the encoder's object store (shared memory on one node, Ray's
node-to-node transfer otherwise), like an `objectstore` KV payload. The object lives while
someone holds the handle (Ray reference counting: the orchestrator keeps it until the request is
done, so a retry can re-prefill from it) and dies with its owner, the encode replica; a prefill
that finds it gone fails with ObjectLostError, and the orchestrator encodes the images again.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INLINE_LIMIT_BYTES = 1 << 20


@dataclass(slots=True)
class StoredEmbeddings:
    ref: object          # ray.ObjectRef of list[ImageEmbedding]
    count: int           # images it holds, in order

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"stored embeddings must hold at least one image, got {self.count}")


def embedding_bytes(embeds: list) -> int:
    return sum(e.embeds.numel() * e.embeds.element_size() for e in embeds)


def maybe_store(embeds: list, inline_limit_bytes: int) -> list:
    """The encode result as sent: the embeddings themselves, or one `StoredEmbeddings` for all."""
    import ray
    if not embeds or embedding_bytes(embeds) <= inline_limit_bytes or not ray.is_initialized():
        return embeds                              # small, or in-process with no store
    return [StoredEmbeddings(ray.put(embeds), len(embeds))]


async def resolve(items: list) -> list:
    """Prefill side: the ImageEmbeddings, in order, fetching any stored ones."""
    out = []
    for item in items:
        if isinstance(item, StoredEmbeddings):
            fetched = await item.ref
            if len(fetched) != item.count:
                raise ValueError(f"stored embeddings hold {len(fetched)} images, expected {item.count}")
            out.extend(fetched)
        else:
            out.append(item)
    return out
