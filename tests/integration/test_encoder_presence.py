"""An encode replica advertises exactly what its embedding cache holds: new images are published
to the routing index, images its LRU evicted are withdrawn (real redis-server, in-process server)."""
import asyncio
import hashlib

from cluster.redis_store import RedisStore
from decoders.model import load_model, prepare_prompt
from services.deployments import EncodeServer


def holders(store: RedisStore, hashes: list[str]) -> list[list[str]]:
    return store.route_snapshot(image_hashes=hashes).mm_holders


def test_evicted_embeddings_are_withdrawn_from_the_index(redis_server, trisect_cache, make_image):
    frontend = load_model("tiny-llava", cache_dir=trisect_cache, frontend_only=True)
    images = [make_image(500 + i) for i in range(3)]
    items = [(hashlib.sha256(im.tobytes()).hexdigest(), prepare_prompt(frontend, "x", [im]).pixel_inputs[0])
             for im in images]
    one_embedding = 16 * 512 * 4                       # tiny-llava: 16 tokens x 512 dims x fp32
    server = EncodeServer("tiny-llava", cache_bytes=one_embedding, cache_dir=str(trisect_cache),
                          redis_url=redis_server.url)
    try:
        store = RedisStore(redis_server.url)
        me = server.instance_id
        asyncio.run(server.encode(items[:1]))
        assert holders(store, [items[0][0]]) == [[me]]
        asyncio.run(server.encode(items[1:2]))             # evicts the first: the cache holds one
        assert holders(store, [items[0][0], items[1][0]]) == [[], [me]]
        assert server.advertised == {items[1][0]}
    finally:
        server.presence.close()
