"""Load test of `serve`: N concurrent clients on loopback against a tiny local model; requests/s, p50/p99, errors.

  python benchmarks/serve.py --clients=1,8,32 --requests=64 --max_seconds=60 --max_tokens=8

The server runs in this process (uvicorn in a thread) over a random-init tiny
decoder with the shipped tokenizer, behind the real app (API key on, queue
bound, deadline). Each client sends chat requests one after another until
`--requests` were sent in all or `--max_seconds` passed. A 429 (queue full) is
counted as an error, as any non-200. One JSON line per client count.
"""

import argparse
import concurrent.futures
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position
import uvicorn  # pylint: disable=wrong-import-position

from safe_completion.backends import base  # pylint: disable=wrong-import-position
from safe_completion.backends import local  # pylint: disable=wrong-import-position
from safe_completion.backends import serve  # pylint: disable=wrong-import-position
from safe_completion.backends import serve_engine  # pylint: disable=wrong-import-position

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tokenizer")
KEY = "sk-bench"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--clients", default="1,8,32", help="Comma-separated concurrent client counts.")
  parser.add_argument("--requests", type=int, default=64, help="Requests per client count, at most.")
  parser.add_argument("--max_seconds", type=float, default=60.0, help="Time per client count, at most.")
  parser.add_argument("--max_tokens", type=int, default=8)
  parser.add_argument("--max_queue", type=int, default=64)
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--out", default=None, help="Append the JSON lines here too.")
  return parser.parse_args(argv)


def _engine(batch_size: int) -> serve_engine.ServeEngine:
  tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR, trust_remote_code=False)
  config = local.transformer.ModelConfig(vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=4,
                                         num_kv_heads=2, head_dim=16, mlp_dim=128, max_seq_len=128)
  params = local.transformer.init_params(config, jax.random.key(0))
  backend = local.LocalBackend(params, config, tokenizer, max_prompt_len=32, batch_size=batch_size,
                               model_id="bench")
  return serve_engine.ServeEngine(backend)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_load(url: str, clients: int, requests: int, max_seconds: float, max_tokens: int) -> dict:
  """`clients` threads sending requests back to back; at most `requests` in all and `max_seconds` of time."""
  lock, sent, latencies, errors = threading.Lock(), [0], [], {}
  stop_at = time.monotonic() + max_seconds
  body = {"model": "bench", "messages": [{"role": "user", "content": "Say something short."}],
          "max_tokens": max_tokens, "temperature": 0.0}

  def client(i: int) -> None:
    with httpx.Client(timeout=max_seconds + 30, headers={"authorization": f"Bearer {KEY}"}) as http:
      while time.monotonic() < stop_at:
        with lock:
          if sent[0] >= requests:
            return
          sent[0] += 1
        start = time.monotonic()
        try:
          status = http.post(f"{url}/chat/completions", json={**body, "seed": i}).status_code
        except httpx.HTTPError as e:
          status = type(e).__name__
        with lock:
          if status == 200:
            latencies.append(time.monotonic() - start)
          else:
            errors[str(status)] = errors.get(str(status), 0) + 1

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(client, range(clients)))
  seconds = time.monotonic() - start
  ok = np.asarray(latencies)
  return {"clients": clients, "requests": sent[0], "ok": len(latencies), "errors": errors, "seconds": seconds,
          "requests_per_s": len(latencies) / seconds if seconds else 0.0,
          "p50_s": float(np.percentile(ok, 50)) if len(ok) else None,
          "p99_s": float(np.percentile(ok, 99)) if len(ok) else None}


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  engine = _engine(args.batch_size)
  # Compile the bucket first so the figures are serving, not compiling.
  engine.generate(engine.encode_chat([{"role": "user", "content": "warm up"}]),
                  base.SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                  deadline=time.monotonic() + 600, cancel=threading.Event())
  app = serve.make_app(engine, api_key=KEY, max_queue=args.max_queue, request_timeout_s=args.max_seconds + 10)
  port = _free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.02)
  results = []
  try:
    for clients in (int(c) for c in args.clients.split(",")):
      result = run_load(f"http://127.0.0.1:{port}/v1", clients, args.requests, args.max_seconds, args.max_tokens)
      results.append(result)
      print(json.dumps(result), flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(result) + "\n")
  finally:
    server.should_exit = True
    thread.join(timeout=10)
  return results


if __name__ == "__main__":
  main()
