"""Answer the lecture's closing questions with measurements: train, sample and score each variant the same way.

    python -m tools.experiments --device cpu --batch-size 128               # about 50 minutes on 2 CPU cores (bf16)
    python -m tools.experiments --device cuda --out runs/exp --no-grids     # minutes on one GPU
    python -m tools.experiments --tiny --device cpu --out /tmp/exp          # seconds on a CPU: the smoke test

Q1, why are the samples' backgrounds noisy? The quick preset trained for a short budget (--epochs), as
  a  the lecture's loop: no EMA, no learning-rate warm-up, no gradient clipping; DDPM sampling, no clipping
  b  a + an EMA of the weights (decay 0.995, with its built-in warm-up)
  c  a's checkpoint, sampled with the predicted x0 clipped to [-1, 1] in every step
  d  the project default (EMA + warm-up + gradient clipping) at lr 2e-4
  e  the project default at lr 1e-3
  f  e with 4x the epochs
  g  e with the cosine schedule (skipped with --skip-cosine)
Q2, deterministic sampling, on f's checkpoint: the DDPM sampler with z = 0 in every step, DDIM (eta 0) over
  50 and 100 steps, beside f's own 600-step DDPM row.

Every run goes through train.main with the flags a user would type; every sampler through sample.generate
(except the z = 0 loop, which is the experiment and is written here); every figure through sample.save_npz,
evaluate.load_samples and evaluate.sample_figures, scored by ONE cached LeNet. Each experiment draws --n
samples from the same seeds, so row k of two grids starts from the same x_T.

Outputs in --out, rewritten after every experiment (a run cut short keeps what it finished):
  results.json  every figure, the configurations, timings, device and torch version
  results.md    the tables (also printed at the end)
  grids.png     one row per experiment, its first 16 samples, rows in the order of results.json's experiments
  <name>.png    an 8x8 grid of each experiment's first 64 samples (left out with --no-grids)
Checkpoints and .npz files go to --work, so that --out stays a handful of small files.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import ddpm
import sample
import train
from support import arguments, checkpoints, data, files, images, runtime
from tools import evaluate

DATA_DIR = "data"  # train.py's and evaluate.py's default
LECTURE_FLAGS = ["--ema-decay", "0", "--warmup-steps", "0", "--grad-clip", "0"]
MORE_EPOCHS_FACTOR = 4
LOW_LR = "2e-4"
# Every run: the quick preset's network as the questions were measured with it (widths 8, 16, 64, 64, one block a
# level, batch 64), at the lecture's lr 1e-3 held constant after the warm-up; each run changes only what its row says.
BASE_FLAGS = ["--preset", "quick", "--widths", "8,16,64,64", "--blocks-per-level", "1", "--lr", "1e-3",
              "--lr-decay", "none"]
FULL = dict(epochs=3, n=1000, ddim_steps=(50, 100), train_flags=[])
# Tiny widths, 64 digits at 16x16, T = 20: the whole script in seconds on one CPU core.
TINY = dict(epochs=2, n=16, ddim_steps=(5, 10),
            train_flags=["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--max-images", "64",
                         "--batch-size", "16"])
NO_NOISE = "ddpm_no_noise"
GRID_SIDE = 8
GRID_ROW_SAMPLES = 16
Q1_CHANGES = [  # (the change, the experiment without it, the experiment with it)
    ("EMA of the weights", "a_lecture", "b_ema"),
    ("x0 clipping when sampling", "a_lecture", "c_lecture_clip_x0"),
    ("lr warm-up + gradient clipping (with EMA)", "b_ema", "e_default"),
    (f"lr {LOW_LR} instead of 1e-3", "e_default", "d_default_lr2e-4"),
    (f"{MORE_EPOCHS_FACTOR}x the epochs", "e_default", "f_default_4x_epochs"),
    ("cosine schedule", "e_default", "g_cosine"),
]


class ExperimentError(Exception):
    """An option the experiments cannot run with (one-line message)."""


# ----------------------------------------------------------------------------- configuration


def parse_args(argv):
    """Return the parsed command line, with --epochs and --n filled in from the full or the tiny plan."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    parser.add_argument("--out", default="runs/experiments", help="results.json, results.md and the grids")
    parser.add_argument("--work", default="runs/experiments/work", help="the runs' checkpoints and the samples' .npz")
    parser.add_argument("--eval-cache", default=os.path.join(DATA_DIR, "eval_cache"),
                        help="evaluate.py's classifier cache (default: evaluate.py's own)")
    parser.add_argument("--n", type=arguments.positive_int, help="samples per experiment (default 1000; tiny 16)")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=1000, help="images per sampling batch")
    parser.add_argument("--epochs", type=arguments.positive_int, help="the short training budget (default 3; tiny 2)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every training and every sampler")
    parser.add_argument("--tiny", action="store_true", help="tiny model, 64 images at 16x16, T = 20, n = 16")
    parser.add_argument("--skip-cosine", action="store_true", help="leave out g, the cosine-schedule run")
    parser.add_argument("--no-grids", action="store_true", help="write no per-experiment <name>.png")
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else FULL
    args.epochs = args.epochs or plan["epochs"]
    args.n = args.n or plan["n"]
    args.ddim_steps, args.train_flags = plan["ddim_steps"], plan["train_flags"]
    arguments.check_device(parser, args.device)
    return args


def base_config(args):
    """Return train.py's configuration for the base run: the quick preset over the lecture's defaults, with the
    recipe the questions' runs were measured with (BASE_FLAGS: widths 8, 16, 64, 64, one block a level, lr 1e-3,
    --lr-decay none)."""
    config, _ = train.parse_config([*BASE_FLAGS, *args.train_flags])
    return config


def training_runs(epochs):
    """Return {run name: train.py flags beyond the base}: the trainings the experiments sample from."""
    short = ["--epochs", str(epochs)]
    return {
        "lecture": [*short, *LECTURE_FLAGS],
        "ema": [*short, *LECTURE_FLAGS, "--ema-decay", "0.995"],
        "default_lr2e-4": [*short, "--lr", LOW_LR],
        "default": short,
        "default_4x_epochs": ["--epochs", str(MORE_EPOCHS_FACTOR * epochs)],
        "cosine": [*short, "--schedule", "cosine"],
    }


def experiment(name, question, what, run, sampler="ddpm", steps=None, clip=False):
    """Return one experiment's description: which run it samples from, and how."""
    return dict(name=name, question=question, what=what, run=run, sampler=sampler, steps=steps, clip=clip)


def experiment_plan(timesteps, ddim_steps, include_cosine):
    """Return the experiments in the order they run and appear in results.json and grids.png."""
    ddpm_steps = f"DDPM {timesteps} steps"
    plan = [
        experiment("a_lecture", "Q1", f"lecture loop (no EMA, warm-up, grad clip); {ddpm_steps}", "lecture"),
        experiment("b_ema", "Q1", "a + EMA 0.995", "ema"),
        experiment("c_lecture_clip_x0", "Q1", "a's checkpoint, x0 clipped to [-1, 1] when sampling", "lecture",
                   clip=True),
        experiment("d_default_lr2e-4", "Q1", f"project default (EMA, warm-up, grad clip), lr {LOW_LR}",
                   "default_lr2e-4"),
        experiment("e_default", "Q1", "project default, lr 1e-3", "default"),
        experiment("f_default_4x_epochs", "Q1", f"e with {MORE_EPOCHS_FACTOR}x the epochs", "default_4x_epochs"),
        experiment("q2_ddpm_no_noise", "Q2", f"{ddpm_steps} with z = 0", "default_4x_epochs",
                   sampler=NO_NOISE),
    ]
    plan += [experiment(f"q2_ddim{steps}", "Q2", f"DDIM eta 0, {steps} steps", "default_4x_epochs",
                        sampler="ddim", steps=steps) for steps in ddim_steps]
    if include_cosine:
        plan.append(experiment("g_cosine", "Q1", "e with the cosine schedule", "cosine"))
    return plan


# ----------------------------------------------------------------------------- training


def train_run(name, extra_flags, args):
    """Return the record of one training through train.main: flags, exit code, seconds, steps, last-epoch loss."""
    out = os.path.join(args.work, name)
    flags = [*BASE_FLAGS, *args.train_flags, *extra_flags, "--grid-samples", "0", "--seed", str(args.seed),
             "--device", args.device, "--out", out, "--force"]
    print(f"\n== training {name}: python train.py {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    exit_code = train.main(flags)
    if exit_code == 130:  # Ctrl-C: train.py saved its checkpoint; stop everything rather than start the next run
        raise KeyboardInterrupt
    record = {"command": "python train.py " + " ".join(flags), "exit_code": exit_code,
              "seconds": time.perf_counter() - start, "checkpoint": os.path.join(out, "checkpoint.pt")}
    if exit_code == 0:
        checkpoint = checkpoints.load_checkpoint(record["checkpoint"])
        last_epoch = checkpoint["losses"][-(len(checkpoint["losses"]) // checkpoint["epoch"]):]
        record.update(config=checkpoint["config"], steps=checkpoint["step"],
                      last_epoch_mean_loss=float(np.mean(last_epoch)))
    return record


# ----------------------------------------------------------------------------- sampling


def sampler_flags(spec, args):
    """Return the sample.py flags that draw this experiment's samples (the z = 0 loop reads --n, --seed, --batch-size)."""
    flags = ["--n", str(args.n), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
             "--device", args.device]
    if spec["sampler"] == "ddim":
        flags += ["--sampler", "ddim", "--steps", str(spec["steps"])]
    if spec["clip"]:
        flags.append("--clip")
    return flags


def batch_generator(seed, batch_index, device):
    """Return the generator of one sampling batch, seeded from (seed, batch_index) as sample.generate seeds it.

    Same seeds, same x_T: the z = 0 rows start from the noise that the DDPM and DDIM rows start from.
    """
    return runtime.seeded_generator(seed, batch_index, device=device)


@torch.no_grad()
def ddpm_without_noise(model, schedule, x_T):
    """Return x_0 from the lecture's reverse process with its noise term removed: z = 0 in every step.

    for t = T-1 .. 0:  x_{t-1} = sample_timestep(x_t, t, noise = 0)
                             = 1 / sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - abar_t) * eps_theta(x_t, t))
    Unlike DDIM (eta 0), this keeps DDPM's means but drops the variance they were derived with.
    """
    x = x_T
    for t in reversed(range(schedule.timesteps)):
        x = ddpm.sample_timestep(model, x, t, schedule, noise=torch.zeros_like(x))
    return x


def generate_without_noise(model, schedule, config, sample_args, device, precision):
    """Return sample_args.n images in [-1, 1] (N, C, H, W) on the CPU from ddpm_without_noise, in seeded batches."""
    samples = []
    for batch_index, start in enumerate(range(0, sample_args.n, sample_args.batch_size)):
        count = min(sample_args.batch_size, sample_args.n - start)
        shape = (count, config["channels"], config["img_size"], config["img_size"])
        x_T = torch.randn(shape, generator=batch_generator(sample_args.seed, batch_index, device), device=device)
        with runtime.autocast(device, precision):
            samples.append(ddpm_without_noise(model, schedule, x_T).float().cpu())
    return torch.cat(samples)


def draw_samples(spec, checkpoint_path, args, device, precision):
    """Return (samples uint8 (N, H, W, 1), seconds, command): the experiment's samples from the run's checkpoint.

    The seconds cover the sampling loop alone (its last step copies to the CPU, so the GPU has finished).
    """
    checkpoint = checkpoints.load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    model = checkpoints.model_from_checkpoint(checkpoint, device, precision)
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"]).to(device)
    flags = ["--checkpoint", checkpoint_path, *sampler_flags(spec, args)]
    sample_args = sample.parse_args(flags)
    start = time.perf_counter()
    if spec["sampler"] == NO_NOISE:
        samples = generate_without_noise(model, schedule, config, sample_args, device, precision)
        command = "experiments.ddpm_without_noise " + " ".join(flags)
    else:
        # x0 is clipped only where the experiment says --clip: its cosine run was measured unclipped
        samples, _ = sample.generate(model, schedule, config, sample_args.n, sampler=sample_args.sampler,
                                     steps=sample_args.steps, eta=sample_args.eta, seed=sample_args.seed,
                                     batch_size=sample_args.batch_size, clip=bool(sample_args.clip),
                                     precision=precision)
        command = "python sample.py " + " ".join(flags)
    return images.to_uint8(samples), time.perf_counter() - start, command


# ----------------------------------------------------------------------------- evaluation


def load_scorer(cache_dir, image_size):
    """Return (classifier, reference, cache): evaluate.py's one cached LeNet and the real digits' figures at image_size."""
    classifier, cache = evaluate.load_or_train_classifier(DATA_DIR, cache_dir)
    real_images, _ = data.load_mnist(DATA_DIR)
    reference = evaluate.cached_reference_statistics(classifier, cache, evaluate.cache_path(cache_dir, cache["split"]),
                                                     real_images, image_size)
    return classifier, reference, cache


def score(npz_path, classifier, reference):
    """Return the figures of the samples in npz_path, read back as evaluate.py reads them."""
    figures = evaluate.sample_figures(evaluate.load_samples(npz_path), classifier, reference)
    keys = ("fid", "confidence", "confident_fraction", "class_entropy_nats", "class_histogram", "dark_mean",
            "midtone_fraction")
    return {key: figures[key] for key in keys}


# ----------------------------------------------------------------------------- the answers


def figure_change(results, before, after, key):
    """Return results[after][key] - results[before][key], or None when either experiment has no figures."""
    figures = {record["name"]: record.get("figures") for record in results["experiments"]}
    if not figures.get(before) or not figures.get(after):
        return None
    return figures[after][key] - figures[before][key]


def q1_changes(results):
    """Return one dict per change of Q1_CHANGES: the change and its effect on FID, dark_mean and midtone_fraction.

    delta = figure(with the change) - figure(without it); negative is better for all three.
    """
    return [{"change": change, "without": before, "with": after,
             **{f"delta_{key}": figure_change(results, before, after, key)
                for key in ("fid", "dark_mean", "midtone_fraction")}}
            for change, before, after in Q1_CHANGES]


def largest_improvements(changes, key, count=2):
    """Return the names of the `count` changes that lower `key` the most (most negative delta first)."""
    measured = [change for change in changes if change[key] is not None and change[key] < 0]
    return [change["change"] for change in sorted(measured, key=lambda change: change[key])[:count]]


def format_figure(value, digits=3):
    """Return a number for a table cell, or '-' when it is missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_fraction(value):
    """Return a fraction as a percentage for a table cell (0.871 -> '87.1%'), or '-' when it is missing."""
    return "-" if value is None else f"{value:.1%}"


def quality_cells(figures):
    """Return the cells both tables end with: recognized | confidence | class entropy | dark mean | mid-tones |."""
    return (f"{format_fraction(figures.get('confident_fraction'))} | "
            f"{format_figure(figures.get('confidence'))} | {format_figure(figures.get('class_entropy_nats'))} | "
            f"{format_figure(figures.get('dark_mean'), 4)} | {format_figure(figures.get('midtone_fraction'), 4)} |")


def markdown_tables(results):
    """Return the Q1 table, the table of changes and the Q2 table as markdown, with a one-line header."""
    records = {record["name"]: record for record in results["experiments"]}
    real = results["real_digits"]
    lines = [f"Device: {results['device']}, torch {results['torch']}, {results['precision']}; "
             f"{results['n']} samples per row, short budget {results['epochs']} epochs, seed {results['seed']}.", "",
             "| experiment | what | train s | FID | vs a | recognized | confidence | class entropy | dark mean | mid-tones |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for record in results["experiments"]:
        if record["question"] != "Q1":
            continue
        figures = record.get("figures") or {}
        train_seconds = results["runs"][record["run"]]["seconds"] if record["trained_here"] else None
        lines.append(f"| {record['name']} | {record['what']} | {format_figure(train_seconds, 1)} | "
                     f"{format_figure(figures.get('fid'), 2)} | "
                     f"{format_figure(figure_change(results, 'a_lecture', record['name'], 'fid'), 2)} | "
                     + quality_cells(figures))
    lines.append("| real digits | MNIST at the same size | - | 0 | - | " + quality_cells(real))
    lines += ["", "| change | from -> to | FID change | dark mean change | mid-tone change |", "|---|---|---|---|---|"]
    for change in results["q1_changes"]:
        lines.append(f"| {change['change']} | {change['without']} -> {change['with']} | "
                     f"{format_figure(change['delta_fid'], 2)} | {format_figure(change['delta_dark_mean'], 4)} | "
                     f"{format_figure(change['delta_midtone_fraction'], 4)} |")
    most = results["q1_most_important"]
    lines += ["", f"Largest FID improvements: {', '.join(most['by_fid']) or 'none'}; "
                  f"largest background improvements (dark mean): {', '.join(most['by_dark_mean']) or 'none'}.", "",
              "| sampler (f's checkpoint) | network calls | sampling s | images/s | FID | recognized | confidence "
              "| class entropy | dark mean | mid-tones |", "|---|---|---|---|---|---|---|---|---|---|"]
    q2_rows = ["f_default_4x_epochs"] + [r["name"] for r in results["experiments"] if r["question"] == "Q2"]
    for name in q2_rows:
        record = records.get(name)
        if record is None:
            continue
        figures = record.get("figures") or {}
        sampling = record.get("sampling") or {}
        sampler = (record["what"] if record["question"] == "Q2"
                   else f"DDPM {record.get('network_calls', '')} steps (the lecture)")
        lines.append(f"| {sampler} | "
                     f"{record.get('network_calls', '-')} | {format_figure(sampling.get('seconds'), 1)} | "
                     f"{format_figure(sampling.get('images_per_second'), 0)} | {format_figure(figures.get('fid'), 2)} | "
                     + quality_cells(figures))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- outputs


def row_of_samples(samples, count=GRID_ROW_SAMPLES):
    """Return uint8 (count, H, W, C): the first `count` samples, black images after the last when there are fewer."""
    row = np.zeros((count, *samples.shape[1:]), dtype=np.uint8)
    row[:min(count, len(samples))] = samples[:count]
    return row


def write_json(path, value):
    """Write value as indented JSON to path atomically (files.write_atomically)."""
    files.write_atomically(path, lambda stream: stream.write(json.dumps(value, indent=1).encode()))


def summary(results):
    """Return the answers drawn from the experiments so far: q1_changes, q1_most_important and the markdown tables."""
    changes = q1_changes(results)
    most_important = {f"by_{key}": largest_improvements(changes, f"delta_{key}") for key in ("fid", "dark_mean")}
    return {"q1_changes": changes, "q1_most_important": most_important,
            "markdown": markdown_tables({**results, "q1_changes": changes, "q1_most_important": most_important})}


def write_outputs(out, results, grid_rows):
    """Write results.json, results.md and grids.png (one row of samples per experiment that has samples)."""
    write_json(os.path.join(out, "results.json"), results)
    files.write_bytes_atomically(os.path.join(out, "results.md"), results["markdown"].encode())
    if grid_rows:
        images.write_png(os.path.join(out, "grids.png"),
                         images.make_grid(np.concatenate(grid_rows), nrow=GRID_ROW_SAMPLES))


def device_description(device):
    """Return the device in words: the GPU's name, or the CPU architecture and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {torch.get_num_threads()} threads)"


def network_calls(spec, timesteps):
    """Return how many times the sampler evaluates the network per image: T for DDPM, the steps for DDIM."""
    return spec["steps"] if spec["sampler"] == "ddim" else timesteps


# ----------------------------------------------------------------------------- the run


def run_experiment(spec, run, args, device, precision, scorer):
    """Return the experiment's record: its samples' figures and timing, or why it was skipped; and its samples."""
    record = dict(spec)
    if run["exit_code"] != 0:
        record["skipped"] = f"training run {spec['run']} failed with exit code {run['exit_code']}"
        return record, None
    record["network_calls"] = network_calls(spec, run["config"]["timesteps"])
    print(f"\n== sampling {spec['name']}: {spec['what']}", flush=True)
    samples, seconds, command = draw_samples(spec, run["checkpoint"], args, device, precision)
    npz_path = os.path.join(args.work, spec["name"] + ".npz")
    sample.save_npz(npz_path, samples)
    classifier, reference = scorer
    record["sampling"] = {"command": command, "seconds": seconds, "images_per_second": len(samples) / seconds,
                          "npz": npz_path}
    record["figures"] = score(npz_path, classifier, reference)
    print(f"   {len(samples)} samples in {seconds:.1f} s; FID {record['figures']['fid']:.2f}, "
          f"recognized {record['figures']['confident_fraction']:.1%}, dark mean {record['figures']['dark_mean']:.4f}",
          flush=True)
    if not args.no_grids:
        record["grid"] = spec["name"] + ".png"
        images.write_png(os.path.join(args.out, record["grid"]),
                         images.make_grid(samples[:GRID_SIDE * GRID_SIDE], nrow=GRID_SIDE))
    return record, samples


def run_all(args):
    """Run every experiment in order, rewriting the outputs after each; return the results dict."""
    started = time.perf_counter()
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision("auto", device)
    config = base_config(args)
    for step in args.ddim_steps:
        if step > config["timesteps"]:
            raise ExperimentError(f"DDIM {step} steps is more than the {config['timesteps']} timesteps; lower the steps")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    print("== evaluation classifier (evaluate.py's, trained and cached on first use)", flush=True)
    classifier_start = time.perf_counter()
    classifier, reference, cache = load_scorer(args.eval_cache, config["img_size"])
    results = {
        "device": device_description(device), "torch": torch.__version__, "precision": precision,
        "tiny": args.tiny, "n": args.n, "sampling_batch_size": args.batch_size, "epochs": args.epochs,
        "seed": args.seed, "base_config": config,
        "classifier": {"version": evaluate.CLASSIFIER_VERSION, "split": cache["split"],
                       "heldout_accuracy": cache["heldout_accuracy"],
                       "seconds_to_load_or_train": time.perf_counter() - classifier_start},
        "real_digits": {"dark_mean": reference["dark_mean"], "midtone_fraction": reference["midtone_fraction"],
                        "confident_fraction": reference["confident_fraction"],
                        "confidence": reference["confidence"], "n": reference["n"]},
        "runs": {}, "experiments": [], "grids_png_rows": [],
    }
    runs = training_runs(args.epochs)
    grid_rows = []
    for spec in experiment_plan(config["timesteps"], args.ddim_steps, not args.skip_cosine):
        trained_here = spec["run"] not in results["runs"]
        if trained_here:
            results["runs"][spec["run"]] = train_run(spec["run"], runs[spec["run"]], args)
        record, samples = run_experiment(spec, results["runs"][spec["run"]], args, device, precision,
                                         (classifier, reference))
        record["trained_here"] = trained_here
        results["experiments"].append(record)
        if samples is not None:
            grid_rows.append(row_of_samples(samples))
            results["grids_png_rows"].append(spec["name"])
        results["total_seconds"] = time.perf_counter() - started
        results.update(summary(results))
        write_outputs(args.out, results, grid_rows)
    return results


def main(argv=None):
    """Parse arguments, run the experiments, print the tables; return the exit code."""
    args = parse_args(argv)
    try:
        results = run_all(args)
    except (ExperimentError, evaluate.EvaluationError, data.DataError, checkpoints.CheckpointError,
            runtime.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nerror: interrupted; {os.path.join(args.out, 'results.json')} holds the experiments finished so far",
              file=sys.stderr)
        return 130
    print("\n" + results["markdown"])
    print(f"total {results['total_seconds']:.0f} s; wrote {os.path.join(args.out, 'results.json')}, grids.png")
    failed = [record["name"] for record in results["experiments"] if "skipped" in record]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
