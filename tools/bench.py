"""Benchmark the lecture's DDPM on this machine: training and sampling throughput, FLOPs, peak memory.

    python -m tools.bench --quick            # about a minute on 2 quiet CPU cores
    python -m tools.bench                    # more repeats and sampling steps
    python -m tools.bench --device cuda      # the same measurements on a GPU

Every configuration is timed in this one process, after warm-up steps, as the median over timed repeats; the
repeats of the baseline and of the fast path alternate, so a change in the machine's load hits both alike.
Training (random images in [-1, 1]; throughput does not depend on the pixels):
  (a) baseline: the lecture's loop: fp32, default memory format, eager, plain torch.optim.Adam, loss.item() each step;
  (b) fast path: train.py's step: bf16 autocast where the hardware runs it natively (runtime.resolve_precision),
      channels_last, train.py's Adam (run_state.build_optimizer), train.train_step (gradient clipping, lr warm-up),
      the EMA update, and the losses read back only every train.LOG_EVERY steps.
Sampling: the 600-step sampler (ddpm.sample) and 50-step DDIM, timed over a few steps and extrapolated.
FLOPs: torch.utils.flop_counter over one forward pass (convolutions and matrix products; a multiply-add is 2 FLOPs);
training costs 3x the forward FLOPs. The device's peak is the FLOP/s of a large matmul timed in this run.
Peak memory: on a CPU the peak RSS of a fresh process that runs a few training steps; on CUDA the peak allocated.
TF32 is off, so fp32 means fp32. The last line printed is one JSON object with every figure.
"""
import argparse
import copy
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import ddpm
import train
import unet
from support import arguments, run_state, runtime

# How much work each mode measures: warm-up and timed steps per configuration, sampler steps timed per draw.
PLANS = {
    "full": dict(warmup_steps=3, repeats=5, steps_per_repeat=2, sampling_steps_per_draw=10, sampling_repeats=3,
                 memory_steps=3, matmul_repeats=10),
    "quick": dict(warmup_steps=2, repeats=3, steps_per_repeat=1, sampling_steps_per_draw=3, sampling_repeats=2,
                  memory_steps=2, matmul_repeats=3),
    "tiny": dict(warmup_steps=1, repeats=2, steps_per_repeat=1, sampling_steps_per_draw=2, sampling_repeats=1,
                 memory_steps=2, matmul_repeats=2),
}
# Threads per plan (None: torch's default, one per core). The tiny smoke run uses one: on a busy machine each of
# its many tiny parallel regions would wait for a descheduled second thread, stretching seconds into minutes.
PLAN_THREADS = {"full": None, "quick": None, "tiny": 1}
# A GPU step takes milliseconds: each timed repeat runs this many times the plan's steps, to average out jitter.
CUDA_STEPS_FACTOR = 10
DDPM_STEPS = 600  # the lecture's T: the sampler runs this many network evaluations per batch
DDIM_STEPS = 50
SAMPLING_BATCH = 128  # sample.py's default batch
TINY_MODEL = dict(widths=[8, 16], blocks_per_level=1, time_emb_dim=16, batch_size=4)
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}
TINY_MATMUL_SIZE = 256


# ----------------------------------------------------------------------------- configuration


def parse_args(argv):
    """Return the parsed command line; an absent device gets an argparse error (exit 2) before any work."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and sampler steps: about a minute on 2 quiet cores")
    size.add_argument("--tiny", action="store_true", help="a seconds-long run with a tiny model (the smoke test)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=arguments.positive_int,
                        help="training and sampling batch; default: each model's train.py batch (128 for the "
                             f"lecture's, 64 for the quick preset's) and {SAMPLING_BATCH} for sampling")
    args = parser.parse_args(argv)
    arguments.check_device(parser, args.device)
    return args


def plan_name(args):
    """Return the name of the measurement plan the flags ask for: 'tiny', 'quick' or 'full'."""
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def model_configs(args):
    """Return {name: train.py configuration} of the models to benchmark, each with its training batch size.

    lecture: train.DEFAULTS (widths 64,128,256, one block per level); quick: train.PRESETS['quick'] over the
    defaults; tiny (--tiny only): widths 8,16, for the smoke test. --batch-size overrides every batch size.
    """
    lecture = {**train.DEFAULTS, "channels": train.DATASET_CHANNELS[train.DEFAULTS["dataset"]]}
    configs = {"tiny": {**lecture, **TINY_MODEL}} if args.tiny else {
        "lecture": lecture,
        "quick": {**lecture, **train.PRESETS["quick"]},
    }
    if args.batch_size:
        configs = {name: {**config, "batch_size": args.batch_size} for name, config in configs.items()}
    return configs


def disable_tf32():
    """Make every fp32 matmul and convolution on CUDA run in true fp32 (no TF32), for the baseline and the fp32 peak."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ----------------------------------------------------------------------------- timing


def synchronize(device):
    """Wait until the device has finished its queued work (CUDA runs asynchronously; a CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(functions, warmup, repeats, calls_per_repeat, device):
    """Return {name: median seconds per call} of each function, timed in alternating repeats after warm-up calls.

    Repeat r times calls_per_repeat calls of each function in turn (synchronizing before reading the clock);
    alternating spreads any change in the machine's load over all of them.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    synchronize(device)
    timings = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls_per_repeat):
                function()
            synchronize(device)
            timings[name].append((time.perf_counter() - start) / calls_per_repeat)
    return {name: statistics.median(values) for name, values in timings.items()}


# ----------------------------------------------------------------------------- training steps


def random_images(config, batch_size, device):
    """Return a fixed batch of random training images in [-1, 1], shape (batch_size, channels, size, size)."""
    generator = torch.Generator().manual_seed(config["seed"])
    shape = (batch_size, config["channels"], config["img_size"], config["img_size"])
    return (torch.rand(shape, generator=generator) * 2 - 1).to(device)


def lecture_training_step(config, batch_size, device):
    """Return a function that runs one step of the lecture's training loop (the baseline).

    fp32, default memory format, eager, plain Adam:
    zero_grad; t ~ U{0..T-1}; loss = get_loss(model, x0, t); backward; Adam step; loss.item() (a host sync).
    """
    model = runtime.build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)
    x0 = random_images(config, batch_size, device)
    losses = []

    def step():
        optimizer.zero_grad()
        t = ddpm.sample_t(batch_size, config["timesteps"], device)
        loss = ddpm.get_loss(model, x0, schedule, t=t)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    return step


def fast_training_step(config, batch_size, device, precision):
    """Return a function that runs one training step as train.py's loop runs it (the project's fast path).

    x0 and eps in the precision's memory format, (t, eps) from train.step_generator, train.train_step under
    runtime.autocast, the EMA update, and the pending losses read back every train.LOG_EVERY steps.
    """
    layout = runtime.memory_format(precision)
    model = runtime.place_model(runtime.build_model(config), device, precision)
    optimizer = run_state.build_optimizer(model, config, device)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)
    images = random_images(config, batch_size, device)
    step_numbers = itertools.count()
    pending = []

    def step():
        step_number = next(step_numbers)
        x0 = images.contiguous(memory_format=layout)
        generator = train.step_generator(config["seed"], 0, step_number, device)
        t = ddpm.sample_t(batch_size, config["timesteps"], device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=device).contiguous(memory_format=layout)
        lr = train.learning_rate(step_number, config["lr"], config["warmup_steps"])
        pending.append(train.train_step(model, optimizer, x0, t, noise, schedule, lr, config["grad_clip"], device,
                                        precision))
        train.update_ema(ema_model, model, train.ema_decay_at(step_number, config["ema_decay"]))
        if len(pending) >= train.LOG_EVERY:
            torch.stack(pending).float().cpu()
            pending.clear()

    return step


def training_step(path, config, batch_size, device, precision):
    """Return the step function of a training path: 'baseline' (the lecture's loop) or 'fast' (train.py's)."""
    if path == "baseline":
        return lecture_training_step(config, batch_size, device)
    return fast_training_step(config, batch_size, device, precision)


# ----------------------------------------------------------------------------- FLOPs and peak


def forward_flops_per_image(config, device):
    """Return the FLOPs of one forward pass of the model for one image (torch.utils.flop_counter; 2 per multiply-add).

    Counts convolutions and matrix products, the bulk of the work; normalizations and activations are left out.
    """
    model = runtime.build_model(config).to(device)
    x = torch.zeros(1, config["channels"], config["img_size"], config["img_size"], device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t)
    return counter.get_total_flops()


def matmul_flops_per_second(dtype, size, repeats, device):
    """Return the FLOP/s of a size x size matmul in dtype: 2 * size**3 / median seconds (the device's practical peak)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    seconds = seconds_per_call({"matmul": lambda: torch.mm(a, b)}, warmup=2, repeats=repeats, calls_per_repeat=1,
                               device=device)["matmul"]
    return 2 * size**3 / seconds


# ----------------------------------------------------------------------------- peak memory


def peak_rss_bytes():
    """Return this process's peak resident set size in bytes: VmHWM of /proc/self/status, else ru_maxrss.

    On Linux, ru_maxrss of a child started by fork and exec begins at its parent's peak, and clear_refs does not
    lower it; VmHWM is the child's own. Elsewhere ru_maxrss is all there is (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_bytes():
    """Return this process's resident set size now, in bytes (/proc/self/statm), or its peak where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss():
    """Return True after resetting this process's peak RSS to its current RSS (Linux: /proc/self/clear_refs), else False."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def report_training_peak_rss(request_json):
    """Print, as one JSON line, the peak RSS of this process over some training steps and its rise over the start.

    The peak is reset just before the model is built where the kernel allows it (else it counts from the start,
    imports included), so a transient of the imports cannot stand in for the training's peak.

    request_json: {"path", "config", "batch_size", "precision", "steps", "threads"}; run by training_peak_memory in
    a fresh process, because a process's peak RSS never goes down: one process cannot show two configurations' peaks.
    """
    request = json.loads(request_json)
    torch.set_num_threads(request["threads"])
    device = torch.device("cpu")
    before = resident_bytes()
    peak_since = "model built" if reset_peak_rss() else "process start"
    step = training_step(request["path"], request["config"], request["batch_size"], device, request["precision"])
    for _ in range(request["steps"]):
        step()
    after = peak_rss_bytes()
    print(json.dumps({"peak_bytes": after, "training_bytes": after - before, "peak_since": peak_since}))


def training_peak_memory(path, config, batch_size, device, precision, steps):
    """Return {'peak_bytes', 'training_bytes'} over `steps` training steps of a path (Adam's state included).

    CPU: a fresh process's peak RSS (whole process, torch included) and its rise over the RSS before the model
    was built.
    CUDA: torch.cuda.max_memory_allocated over the steps, and its rise over what was allocated before.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step = training_step(path, config, batch_size, device, precision)
        for _ in range(steps):
            step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak, "training_bytes": peak - before}
    request = json.dumps({"path": path, "config": config, "batch_size": batch_size, "precision": precision,
                          "steps": steps, "threads": torch.get_num_threads()})
    completed = subprocess.run(
        [sys.executable, "-c", "import sys; from tools import bench; bench.report_training_peak_rss(sys.argv[1])", request],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- sampling


def sampling_model(config, device, precision):
    """Return a freshly initialised model in eval mode, in the memory format of the precision."""
    torch.manual_seed(config["seed"])
    return runtime.place_model(runtime.build_model(config), device, precision).eval()


def sampling_draw(model, config, batch_size, device, precision, sampler, steps):
    """Return a function that draws one batch with `steps` network evaluations of a sampler.

    ddpm: ddpm.sample over a `steps`-step linear schedule, whose every step does the work of one of the 600
    (network, reverse mean, fresh noise); ddim: ddpm.ddim_sample with `steps` steps of the 600-step schedule.
    """
    shape = (batch_size, config["channels"], config["img_size"], config["img_size"])
    layout = runtime.memory_format(precision)
    generator = torch.Generator(device=device).manual_seed(config["seed"])
    if sampler == "ddpm":
        schedule = ddpm.Schedule.create(steps, config["schedule"]).to(device)
    else:
        schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)

    def draw():
        x_T = torch.randn(shape, generator=generator, device=device).contiguous(memory_format=layout)
        with runtime.autocast(device, precision):
            if sampler == "ddpm":
                ddpm.sample(model, schedule, shape, generator=generator, x_T=x_T)
            else:
                ddpm.ddim_sample(model, schedule, shape, steps=steps, x_T=x_T)

    return draw


# ----------------------------------------------------------------------------- the benchmark


def timing_plan(plan, device):
    """Return the plan's timing figures for this device: on a GPU, CUDA_STEPS_FACTOR times the steps per repeat
    and per sampling draw (the draw at most DDIM_STEPS steps)."""
    factor = CUDA_STEPS_FACTOR if device.type == "cuda" else 1
    return {**plan, "steps_per_repeat": plan["steps_per_repeat"] * factor,
            "sampling_steps_per_draw": min(plan["sampling_steps_per_draw"] * factor, DDIM_STEPS)}


def measure_training(name, config, batch_size, device, precision, plan):
    """Return the training figures of one model: images/s of both paths, their ratio, FLOPs and achieved FLOP/s."""
    steps = {path: training_step(path, config, batch_size, device, precision) for path in ("baseline", "fast")}
    seconds = seconds_per_call(steps, plan["warmup_steps"], plan["repeats"], plan["steps_per_repeat"], device)
    del steps  # frees both models and their optimizers before the next configuration is built
    flops = forward_flops_per_image(config, device)
    baseline, fast = batch_size / seconds["baseline"], batch_size / seconds["fast"]
    return {
        "model": name,
        "widths": list(config["widths"]),
        "blocks_per_level": config["blocks_per_level"],
        "parameters": unet.count_parameters(runtime.build_model(config)),
        "batch_size": batch_size,
        "baseline_images_per_s": baseline,
        "fast_images_per_s": fast,
        "speedup": fast / baseline,
        "forward_flops_per_image": flops,
        "baseline_flops_per_s": 3 * flops * baseline,
        "fast_flops_per_s": 3 * flops * fast,
    }


def measure_sampling(name, config, batch_size, device, precision, plan):
    """Return the sampling figures: images/s of finished samples for DDPM-600 (both paths) and DDIM-50 (fast path).

    images/s = batch_size / (seconds per step * total steps), the seconds per step timed over a few steps.
    """
    steps = plan["sampling_steps_per_draw"]
    models = {"baseline": sampling_model(config, device, "fp32"), "fast": sampling_model(config, device, precision)}
    draws = {
        "ddpm_baseline": sampling_draw(models["baseline"], config, batch_size, device, "fp32", "ddpm", steps),
        "ddpm_fast": sampling_draw(models["fast"], config, batch_size, device, precision, "ddpm", steps),
        "ddim_fast": sampling_draw(models["fast"], config, batch_size, device, precision, "ddim", steps),
    }
    seconds = seconds_per_call(draws, warmup=1, repeats=plan["sampling_repeats"], calls_per_repeat=1, device=device)
    per_step = {draw_name: value / steps for draw_name, value in seconds.items()}
    baseline = batch_size / (per_step["ddpm_baseline"] * DDPM_STEPS)
    fast = batch_size / (per_step["ddpm_fast"] * DDPM_STEPS)
    return {
        "model": name,
        "batch_size": batch_size,
        "timed_steps_per_draw": steps,
        "ddpm600_baseline_images_per_s": baseline,
        "ddpm600_fast_images_per_s": fast,
        "speedup": fast / baseline,
        "ddim50_fast_images_per_s": batch_size / (per_step["ddim_fast"] * DDIM_STEPS),
    }


def device_description(device):
    """Return the device's name: the GPU's, or the CPU's model name from /proc/cpuinfo (else platform.processor())."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_benchmark(args):
    """Return every figure of the benchmark as one dict (the JSON line), measuring in this process."""
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision("auto", device)
    plan = timing_plan(PLANS[plan_name(args)], device)
    if PLAN_THREADS[plan_name(args)] is not None:
        torch.set_num_threads(PLAN_THREADS[plan_name(args)])
    disable_tf32()
    results = {
        "mode": plan_name(args),
        "device": device.type,
        "device_name": device_description(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fast_precision": precision,
        "fast_memory_format": "channels_last" if precision == "bf16" else "contiguous",
        "torch_compile": "not used",
        "load_average_before": os.getloadavg()[0],
        "timing": plan,
    }
    configs = model_configs(args)
    results["training"] = [measure_training(name, config, config["batch_size"], device, precision, plan)
                           for name, config in configs.items()]
    first_name, first_config = next(iter(configs.items()))
    sampling_batch = args.batch_size or (TINY_MODEL["batch_size"] if args.tiny else SAMPLING_BATCH)
    results["sampling"] = measure_sampling(first_name, first_config, sampling_batch, device, precision, plan)
    size = TINY_MATMUL_SIZE if args.tiny else MATMUL_SIZE[device.type]
    peaks = {dtype_name: matmul_flops_per_second(dtype, size, plan["matmul_repeats"], device)
             for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    results["peak_matmul"] = {"size": size, "fp32_flops_per_s": peaks["fp32"], "bf16_flops_per_s": peaks["bf16"]}
    for figures in results["training"]:
        figures["baseline_fraction_of_fp32_peak"] = figures["baseline_flops_per_s"] / peaks["fp32"]
        figures["fast_fraction_of_peak"] = figures["fast_flops_per_s"] / peaks[precision]
    results["memory"] = {
        "kind": "peak allocated (torch.cuda.max_memory_allocated)" if device.type == "cuda"
        else "peak RSS of a fresh process (VmHWM, reset before the model is built)",
        "model": first_name,
        "batch_size": first_config["batch_size"],
        **{path: training_peak_memory(path, first_config, first_config["batch_size"], device, precision,
                                      plan["memory_steps"])
           for path in ("baseline", "fast")},
    }
    results["load_average_after"] = os.getloadavg()[0]
    return results


# ----------------------------------------------------------------------------- output


def format_table(header, rows):
    """Return rows of strings as text columns, left-aligned first column, right-aligned others, under a header."""
    table = [header] + rows
    widths = [max(len(row[column]) for row in table) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))) for row in table]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def busy_warning(load_average, threads):
    """Return a one-line warning when other work was running (load average >= 1) before a multi-threaded run, else none.

    Each parallel region waits for all its threads, so one descheduled thread stalls them all: the many short
    regions of the fast path suffer most, and its ratio to the baseline comes out too low.
    """
    if load_average < 1 or threads < 2:
        return []
    return [f"warning: load average {load_average:.2f} before the run: other processes share the cores, so these "
            "timings (the fast path's most) are too low; rerun on a quiet machine"]


def report(results):
    """Return the human-readable report of the results: a header, the training, sampling and memory tables."""
    plan = results["timing"]
    precision = results["fast_precision"]
    fast_label = f"fast ({precision}, {results['fast_memory_format']})"
    lines = [
        f"DDPM benchmark ({results['mode']}): {results['device']} ({results['device_name']}), torch {results['torch']}, "
        f"{results['threads']} threads, load average {results['load_average_before']:.2f} before, "
        f"{results['load_average_after']:.2f} after",
        *busy_warning(results["load_average_before"], results["threads"]),
        "",
        f"Training, images/s: median of {plan['repeats']} repeats of {plan['steps_per_repeat']} step(s) after "
        f"{plan['warmup_steps']} warm-up steps; baseline = the lecture's loop in fp32, fast = train.py's step "
        f"(torch.compile: {results['torch_compile']})",
    ]
    peak = results["peak_matmul"]
    rows = [[f["model"], f"{f['parameters'] / 1e6:.2f}M", str(f["batch_size"]), f"{f['baseline_images_per_s']:.1f}",
             f"{f['fast_images_per_s']:.1f}", f"{f['speedup']:.2f}x", f"{f['forward_flops_per_image'] / 1e9:.3f}",
             f"{f['baseline_flops_per_s'] / 1e9:.1f} ({100 * f['baseline_fraction_of_fp32_peak']:.0f}%)",
             f"{f['fast_flops_per_s'] / 1e9:.1f} ({100 * f['fast_fraction_of_peak']:.0f}%)"]
            for f in results["training"]]
    lines.append(format_table(["model", "params", "batch", "baseline fp32", fast_label, "fast/baseline",
                               "fwd GFLOP/img", "baseline GFLOP/s (% fp32 peak)",
                               f"fast GFLOP/s (% {precision} peak)"], rows))
    lines += ["", f"Peak: a {peak['size']}x{peak['size']} matmul timed in this run: "
                  f"fp32 {peak['fp32_flops_per_s'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16_flops_per_s'] / 1e9:.1f} GFLOP/s; "
                  "training FLOP/s = 3 x forward FLOPs x images/s"]
    sampling = results["sampling"]
    lines += ["", f"Sampling, images/s of finished samples, {sampling['model']} model, batch {sampling['batch_size']}: "
                  f"{sampling['timed_steps_per_draw']} steps timed (median of {plan['sampling_repeats']}) and "
                  f"extrapolated to {DDPM_STEPS} (DDPM) or {DDIM_STEPS} (DDIM) steps",
              format_table(["sampler", "baseline fp32", fast_label, "fast/baseline"], [
                  [f"DDPM {DDPM_STEPS} steps", f"{sampling['ddpm600_baseline_images_per_s']:.3f}",
                   f"{sampling['ddpm600_fast_images_per_s']:.3f}", f"{sampling['speedup']:.2f}x"],
                  [f"DDIM {DDIM_STEPS} steps", "-", f"{sampling['ddim50_fast_images_per_s']:.3f}", "-"]])]
    memory = results["memory"]
    lines += ["", f"Peak memory of training, {memory['model']} model, batch {memory['batch_size']}: {memory['kind']}",
              format_table(["path", "peak MiB", "rise over the start MiB"], [
                  [path, f"{memory[path]['peak_bytes'] / 2**20:.0f}", f"{memory[path]['training_bytes'] / 2**20:.0f}"]
                  for path in ("baseline", "fast")])]
    return "\n".join(lines)


def main(argv=None):
    """Parse arguments, run the benchmark, print the report and then the JSON line; return the exit code."""
    args = parse_args(argv)
    results = run_benchmark(args)
    print(report(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
