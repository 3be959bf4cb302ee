"""Run in a separate process: import KV payloads written by another process and decode them.

usage: python kv_import_worker.py MODEL CACHE_DIR OUT.json PAYLOAD [PAYLOAD ...]
"""
import json
import sys
from pathlib import Path

from decoders.config import EngineConfig
from decoders.engine import Engine
from decoders.kv_payload import KVPayload
from decoders.model import load_model


def main(model: str, cache_dir: str, out_path: str, *payload_paths: str) -> None:
    engine = Engine(load_model(model, cache_dir=cache_dir), EngineConfig(block_size=8, role="decode"))
    for path in payload_paths:
        engine.import_kv(KVPayload.from_bytes(Path(path).read_bytes()))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    free = engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    Path(out_path).write_text(json.dumps({"tokens": tokens, "all_blocks_free": free}))


if __name__ == "__main__":
    main(*sys.argv[1:])
