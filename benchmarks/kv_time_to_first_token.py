"""Where the time to the first token goes: load the model, then generate one token after a prompt
cut from the pydoc corpus through the default (dense) cache, and print wall and process-CPU seconds
with the compilation events (trace, lower, compile, stored-executable load) per function, as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax

from lowbit.checkpoint import load_model_and_tokenizer
from lowbit.data.corpus import load_text
from lowbit.decode import generate
from lowbit.decode.compilation import COMPILE_EVENTS, enable_compilation_cache


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--start", type=int, default=104_000, help="first token of the prompt in pydoc")
    parser.add_argument("--length", type=int, default=514, help="prompt tokens")
    args = parser.parse_args(argv)
    enable_compilation_cache()
    events = collections.defaultdict(float)

    def record(event, seconds, **kwargs):
        if event in COMPILE_EVENTS:
            events[f"{event.rsplit('/', 1)[-1]} {kwargs.get('fun_name')}"] += seconds

    jax.monitoring.register_event_duration_secs_listener(record)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    load_s = time.perf_counter() - start
    ids = tokenizer.encode(load_text())[args.start:args.start + args.length]
    stamps = {}
    cpu = time.process_time()
    generate(model, ids, 1, timings=stamps)
    print(json.dumps({"prompt_tokens": len(ids), "load_s": round(load_s, 2),
                      "first_token_s": round(stamps["first_token"] - stamps["start"], 2),
                      "first_token_cpu_s": round(time.process_time() - cpu, 2),
                      "compile_events_s": {k: round(v, 2) for k, v in sorted(events.items(), key=lambda kv: -kv[1])
                                           if v >= 0.01}}))


if __name__ == "__main__":
    main()
