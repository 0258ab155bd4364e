"""The table and ratios of `scripts/service-load.sh --compare` (stdlib only).

Reads the JSON lines of one run: examples/service_load's `--json` output ("kind": "level" per
level, "system_prompt" per engine) and the script's "run" lines (peak RSS), each engine named
"<engine>:<precision>" (qwen2-edge:int8, llama-server:int8 = Q8_0, ...).

    python3 scripts/service_load_table.py results.jsonl
"""

import json
import sys


def fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or not b else a / b


def main(path):
    levels, runs, prompts, order = {}, {}, {}, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            engine = r.get("engine")
            if engine not in order:
                order.append(engine)
            if r["kind"] == "level":
                levels.setdefault(engine, {})[r["clients"]] = r
            elif r["kind"] == "run":
                runs[engine] = r
            elif r["kind"] == "system_prompt":
                prompts[engine] = r.get("prompt_tokens")

    head = ("engine", "prec", "clients", "ok/req", "req/s", "gen tok/s", "gen/req",
            "prompt(cached)", "TTFT p50", "TTFT p99", "total p50", "total p99", "cold TTFT",
            "peak RSS")
    widths = (12, 5, 7, 7, 7, 9, 7, 14, 9, 9, 9, 9, 9, 9)
    print("times in ms; generated tokens/s (usage.completion_tokens) over the level's wall time; "
          "prompt tokens per request (of them from the server's cache, where it reports it); "
          "peak RSS (VmHWM) of the server over its whole run, MiB")
    print(" ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for engine in order:
        name, _, prec = engine.partition(":")
        rss = runs.get(engine, {}).get("peak_rss_kb")
        for n, (clients, r) in enumerate(sorted(levels.get(engine, {}).items())):
            cells = (
                name, prec, str(clients), f"{r['ok']}/{r['requests']}",
                fmt(r["req_per_s"], ".2f"), fmt(r["gen_tok_per_s"]),
                fmt(r["completion_tokens_mean"]),
                fmt(r["prompt_tokens_mean"], ".0f")
                + (f" ({r['cached_prompt_tokens_mean']:.0f})"
                   if r.get("cached_prompt_tokens_mean") is not None else ""),
                fmt(r["ttft_p50_ms"]), fmt(r["ttft_p99_ms"]),
                fmt(r["total_p50_ms"]), fmt(r["total_p99_ms"]), fmt(r.get("cold_ttft_ms")),
                fmt(rss / 1024 if rss and n == 0 else None, ".0f", ""),
            )
            print(" ".join(c.rjust(w) if i > 1 else c.ljust(w)
                           for i, (c, w) in enumerate(zip(cells, widths))))
        if engine in runs and "model" in runs[engine]:
            print(f"{'':14}model {runs[engine]['model']}")

    print("\nratios")
    precisions = []
    for engine in order:
        prec = engine.partition(":")[2]
        if prec not in precisions:
            precisions.append(prec)
    for prec in precisions:
        ours = levels.get(f"qwen2-edge:{prec}", {})
        peer = levels.get(f"llama-server:{prec}", {})

        def tok(side, clients):
            r = side.get(clients)
            return r["gen_tok_per_s"] if r else None

        def req(side, clients):
            r = side.get(clients)
            return r["req_per_s"] if r else None

        print(f"  {prec}:")
        print(f"    gen tok/s 4 clients / 1 client: qwen2-edge {fmt(ratio(tok(ours, 4), tok(ours, 1)), '.2f')}, "
              f"llama-server {fmt(ratio(tok(peer, 4), tok(peer, 1)), '.2f')}")
        for c in (4, 16):
            print(f"    qwen2-edge / llama-server at {c} clients: gen tok/s "
                  f"{fmt(ratio(tok(ours, c), tok(peer, c)), '.2f')}, req/s "
                  f"{fmt(ratio(req(ours, c), req(peer, c)), '.2f')}")
        for name, side in (("qwen2-edge", ours), ("llama-server", peer)):
            one = side.get(1)
            if one and one.get("cold_ttft_ms") is not None:
                cached, cold = one["cached_ttft_p50_ms"], one["cold_ttft_ms"]
                print(f"    {name}: TTFT cached system prompt (p50 {fmt(cached)} ms) / cold "
                      f"({fmt(cold)} ms): {fmt(ratio(cached, cold), '.2f')}")
        rss = runs.get(f"qwen2-edge:{prec}", {}).get("peak_rss_kb")
        peer_rss = runs.get(f"llama-server:{prec}", {}).get("peak_rss_kb")
        most = max(ours) if ours else None
        print(f"    peak RSS with up to {most} clients: qwen2-edge {fmt(rss / 1024 if rss else None, '.0f')} MiB, "
              f"llama-server {fmt(peer_rss / 1024 if peer_rss else None, '.0f')} MiB")

    if prompts:
        print("\nsystem prompt sent alone, chat template included (prompt tokens): "
              + ", ".join(f"{e} {fmt(t, 'd')}" for e, t in prompts.items()))
    notes = [f"{e} at {c} clients: {r['errors']} errors" for e in order
             for c, r in sorted(levels.get(e, {}).items()) if r["errors"]]
    notes += [f"{e} at {c} clients: tokens counted as streamed pieces (no usage)" for e in order
              for c, r in sorted(levels.get(e, {}).items()) if r["tokens_from"] != "usage"]
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main(sys.argv[1])
