#!/usr/bin/env python3
"""onnxruntime-genai's own generate on an ONNX model folder, measured as `edgellm bench`
measures: a prompt of N random tokens (one batch), then G greedy tokens, medians over R runs
after a warm-up. Prints one JSON object like `edgellm bench`.

Optional: for comparing the ORT backend with onnxruntime-genai on the same file and threads.
Needs the wheels (not a project dependency):
    python3 -m venv /tmp/genai && /tmp/genai/bin/pip install onnxruntime==1.32.0 onnxruntime-genai==0.18.0
    /tmp/genai/bin/python scripts/bench-genai.py MODEL_DIR --threads 2
"""
import argparse, json, random, statistics, time

import onnxruntime_genai as og

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("-p", "--n-prompt", type=int, default=128)
ap.add_argument("-n", "--n-gen", type=int, default=64)
ap.add_argument("-r", "--reps", type=int, default=5)
a = ap.parse_args()

cfg = og.Config(a.model)
cfg.clear_providers()
# genai passes session options through its config: the thread count of the CPU provider.
model_cfg = json.load(open(f"{a.model}/genai_config.json"))
opts = model_cfg["model"]["decoder"]["session_options"]
opts["intra_op_num_threads"] = a.threads
opts["inter_op_num_threads"] = 1
import os, shutil, tempfile
tmp = tempfile.mkdtemp()
for f in os.listdir(a.model):
    if f != "genai_config.json":
        os.symlink(os.path.join(os.path.abspath(a.model), f), os.path.join(tmp, f))
json.dump(model_cfg, open(os.path.join(tmp, "genai_config.json"), "w"))
model = og.Model(tmp)
vocab = model_cfg["model"]["vocab_size"]
rng = random.Random(1234)
pp, tg = [], []
for rep in range(a.reps + 1):
    prompt = [rng.randrange(vocab) for _ in range(a.n_prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=a.n_prompt + a.n_gen, do_sample=False, min_length=a.n_prompt + a.n_gen)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    for _ in range(a.n_gen):
        gen.generate_next_token()
    t2 = time.perf_counter()
    if rep > 0:
        pp.append(t1 - t0)
        tg.append(t2 - t1)
shutil.rmtree(tmp)
pp_s, tg_s = statistics.median(pp), statistics.median(tg)
print(json.dumps({"model": os.path.basename(os.path.abspath(a.model)), "backend": "onnxruntime-genai " + og.__version__,
                  "threads": a.threads, "n_prompt": a.n_prompt, "n_gen": a.n_gen, "reps": a.reps,
                  "pp_tps": a.n_prompt / pp_s, "tg_tps": a.n_gen / tg_s, "ttft_ms": pp_s * 1e3}))
