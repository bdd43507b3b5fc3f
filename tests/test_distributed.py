"""Tests of train.py under torchrun: two CPU processes (gloo), a tiny model, a few steps each.

Claims checked: the two ranks end with identical weights and EMA, each on its own half of the images; one
data-parallel step on two halves equals one single-process step on the whole batch (gradients are averaged, not
summed or left per rank); only rank 0 prints and writes, once per file; the checkpoint loads and counts the steps
of both ranks once; a run whose rank 0 meets a full disk stops every rank with that one error line, and resumed
under torchrun ends where an uninterrupted one does; rank 1 reads the
data only after rank 0 has downloaded it; a plain `python train.py` says no more about processes than "1 process(es)".

Runs under torchrun go through RANK_RECORDER, a launcher written into a temporary folder that runs train.py
unchanged (runpy, as __main__) and records, per rank, every file it opens for writing or reading and everything
it prints (Python audit hooks): that is how the tests see what rank 1 did.
"""
import copy
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import ddpm
import train
from repo_paths import BUNDLED_DATA, ROOT
from support import checkpoints, data, runtime

TRAIN_SCRIPT = os.path.join(ROOT, "train.py")
WORLD_SIZE = 2
RUN_TIMEOUT_S = 120  # a hung collective fails the test instead of blocking the suite

# The tiny configuration; warm-up 0 and lr 3e-3 so that 8 steps visibly lower the loss (with the default
# 100-step warm-up, step 8 would still use lr 8e-5), and a 4-image grid so that grid writing is exercised.
TINY_FLAGS = ["--widths", "8,16", "--img-size", "16", "--timesteps", "20", "--max-images", "64", "--batch-size", "8",
              "--grid-samples", "4", "--precision", "fp32", "--device", "cpu", "--warmup-steps", "0", "--lr", "3e-3"]
STEPS_PER_EPOCH = 64 // (8 * WORLD_SIZE)

RANK_RECORDER = '''
"""Run train.py as __main__ on this rank, recording the files it opens or renames and what it prints (test only)."""
import atexit, json, os, runpy, shutil, sys, time

REPO, RECORD_DIR = os.environ["TRAIN_REPO"], os.environ["RECORD_DIR"]
sys.path.insert(0, REPO)
record = {"written": [], "read": [], "stdout": []}


def on_event(event, args):
    if event == "open" and isinstance(args[0], str):
        writing = args[2] & (os.O_WRONLY | os.O_RDWR)
        record["written" if writing else "read"].append(os.path.abspath(args[0]))
    elif event == "os.rename":  # os.replace raises this event too
        record["written"].append(os.path.abspath(args[1]))
    elif event in ("os.remove", "os.mkdir"):
        record["written"].append(os.path.abspath(args[0]))


class PrintRecorder:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        record["stdout"].append(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def save_record():
    text = json.dumps(record)
    with open(os.path.join(RECORD_DIR, "rank" + os.environ["RANK"] + ".json"), "w") as stream:
        stream.write(text)


def slow_download_mnist(data_dir, *args, **kwargs):
    """Stand-in for the network: after a delay, the training split appears (copies of the repository's test split)."""
    from support import data
    time.sleep(float(os.environ["FAKE_DOWNLOAD_DELAY_S"]))
    for test_name, train_name in zip(data.MNIST_TEST_FILES, data.MNIST_TRAIN_FILES):
        shutil.copy(os.path.join(REPO, "data", test_name), os.path.join(data_dir, train_name + ".part"))
        os.replace(os.path.join(data_dir, train_name + ".part"), os.path.join(data_dir, train_name))


if "FAKE_DOWNLOAD_DELAY_S" in os.environ:
    from support import data
    data.download_mnist = slow_download_mnist
if "FAIL_SAVE_AT_STEP" in os.environ and os.environ["RANK"] == "0":  # a full disk, on the rank that writes
    import errno
    from support import checkpoints
    real_save_checkpoint = checkpoints.save_checkpoint

    def failing_save_checkpoint(path, checkpoint):
        if checkpoint["step"] == int(os.environ["FAIL_SAVE_AT_STEP"]):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save_checkpoint(path, checkpoint)

    checkpoints.save_checkpoint = failing_save_checkpoint
if "FAIL_GRID_AT_EPOCH" in os.environ and os.environ["RANK"] == "0":  # not a write error: a bug, or out of memory
    import sample
    real_preview_grid = sample.preview_grid
    grids_made = []

    def failing_preview_grid(*args, **kwargs):
        grids_made.append(1)
        if len(grids_made) == int(os.environ["FAIL_GRID_AT_EPOCH"]):
            raise RuntimeError("injected failure while sampling the preview grid")
        return real_preview_grid(*args, **kwargs)

    sample.preview_grid = failing_preview_grid
atexit.register(save_record)
sys.stdout = PrintRecorder(sys.stdout)
sys.addaudithook(on_event)
runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
'''


# ----------------------------------------------------------------------------- helpers: torchrun


def torchrun(flags, record_dir, extra_env=None):
    """Return the finished `torchrun --nproc_per_node=2 train.py FLAGS` process; each rank's record in record_dir.

    No port is picked and released: --standalone binds its rendezvous store to port 0, so the OS gives each launch
    a free port of its own, and the workers join their process group through that same store (torch 2.13, which
    CI pins, shares it: TORCHELASTIC_USE_AGENT_STORE), so tests running beside other programs cannot collide on a
    port.
    """
    os.makedirs(record_dir, exist_ok=True)
    launcher = os.path.join(record_dir, "rank_recorder.py")
    with open(launcher, "w") as stream:
        stream.write(RANK_RECORDER)
    # torchrun keeps a log folder per launch (tempfile.mkdtemp(prefix="torchelastic_")) and never removes it:
    # TMPDIR puts it inside the test's own temporary folder instead of leaving one in /tmp per launch.
    temporary = os.path.join(record_dir, "tmp")
    os.makedirs(temporary, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_REPO": ROOT, "RECORD_DIR": str(record_dir),
           "TMPDIR": temporary, **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               launcher, *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def rank_records(record_dir):
    """Return each rank's record: {'written': [paths], 'read': [paths], 'stdout': text}, rank 0 first."""
    records = []
    for rank in range(WORLD_SIZE):
        with open(os.path.join(record_dir, f"rank{rank}.json")) as stream:
            record = json.load(stream)
        records.append({**record, "stdout": "".join(record["stdout"])})
    return records


def paths_in(paths, folder):
    """Return the paths inside folder (absolute), in order, repeats kept."""
    prefix = os.path.abspath(folder) + os.sep
    return [path for path in paths if path.startswith(prefix)]


def read_losses(out_dir):
    """Return loss.csv as a list of (step, epoch, loss)."""
    with open(os.path.join(out_dir, "loss.csv")) as stream:
        return [(int(row["step"]), int(row["epoch"]), float(row["loss"])) for row in csv.DictReader(stream)]


def assert_finished(process):
    """Fail with both output streams unless the process exited with 0."""
    assert process.returncode == 0, f"exit {process.returncode}\nstdout:\n{process.stdout}\nstderr:\n{process.stderr}"


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """Return (process, out_dir, records) of one uninterrupted 2-epoch torchrun run of the tiny configuration."""
    root = tmp_path_factory.mktemp("two_epochs")
    out_dir = root / "run"
    process = torchrun([*TINY_FLAGS, "--epochs", "2", "--out", str(out_dir)], root / "records")
    assert_finished(process)
    return process, out_dir, rank_records(root / "records")


# ----------------------------------------------------------------------------- helpers: process groups in-process


def tiny_config(**overrides):
    """Return train.py's configuration for the tiny model of these tests (fp32 on CPU), with overrides."""
    return {**train.DEFAULTS, "channels": 1, "widths": [8, 16], "img_size": 16, "timesteps": 20, "batch_size": 8,
            "max_images": 64, "warmup_steps": 0, "lr": 3e-3, **overrides}


def join_group(rank, init_file):
    """Join a 2-process gloo group through a rendezvous file (no network ports)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)


def spawn(worker, tmp_path, *args):
    """Run worker(rank, init_file, *args) on 2 processes; the first to fail raises here."""
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), *args), nprocs=WORLD_SIZE, join=True)


def lr_at(config, step):
    """Return train.py's learning rate at step for config."""
    return train.learning_rate(step, config["lr"], config["warmup_steps"])


def train_steps_on_rank(rank, init_file, config, steps, result_path):
    """Save this rank's weights, EMA, losses and image indices after `steps` DDP steps taken as train.train takes them.

    Per step: this rank's share epoch_permutation(...)[rank::2] of the images, t and noise from
    step_generator(seed, rank, step), train_step on the DDP model, update_ema on the unwrapped model.
    """
    torch.set_num_threads(1)
    join_group(rank, init_file)
    try:
        device = torch.device("cpu")
        torch.manual_seed(config["seed"])
        dataset = data.load_training_images(config, BUNDLED_DATA, False, lambda message: None)
        schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"])
        model = runtime.build_model(config)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        ddp_model = DistributedDataParallel(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
        steps_per_epoch = len(dataset) // (config["batch_size"] * WORLD_SIZE)
        used_images, losses = [], []
        for step in range(steps):
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            order = train.epoch_permutation(len(dataset), config["seed"], epoch)[rank::WORLD_SIZE]
            batch = order[step_in_epoch * config["batch_size"]:(step_in_epoch + 1) * config["batch_size"]]
            generator = train.step_generator(config["seed"], rank, step, device)
            t = ddpm.sample_t(len(batch), config["timesteps"], device, generator)
            noise = torch.randn(dataset[batch].shape, generator=generator)
            losses.append(train.train_step(ddp_model, optimizer, dataset[batch], t, noise, schedule, lr_at(config, step),
                                           config["grad_clip"], device, "fp32"))
            train.update_ema(ema_model, model, train.ema_decay_at(step, config["ema_decay"]))
            used_images.append((epoch, batch))
        torch.save({"model": model.state_dict(), "ema": ema_model.state_dict(), "losses": torch.stack(losses),
                    "used_images": used_images}, result_path.format(rank=rank))
    finally:
        dist.destroy_process_group()


def weights_and_gradients_after_one_step(model_to_train, model, optimizer, x0, t, noise, config):
    """Return ({name: weight}, {name: gradient}) of model after one train.train_step of model_to_train.

    model_to_train is the model itself or its DDP wrapper; the gradients are what the optimizer stepped with.
    """
    schedule = ddpm.Schedule.create(config["timesteps"], config["schedule"])
    train.train_step(model_to_train, optimizer, x0, t, noise, schedule, lr_at(config, 0), config["grad_clip"],
                     torch.device("cpu"), "fp32")
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return weights, gradients


def make_optimizer(name, model, config):
    """Return train.py's Adam ('adam') or plain SGD ('sgd', whose step is proportional to the gradient)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=config["lr"])
    return torch.optim.SGD(model.parameters(), lr=config["lr"])


def one_step_on_half(rank, init_file, configs, x0, t, noise, result_path):
    """Take one DDP step per (optimizer name, config) on this rank's half of (x0, t, noise); save the results."""
    torch.set_num_threads(1)
    join_group(rank, init_file)
    try:
        half = slice(rank * len(x0) // WORLD_SIZE, (rank + 1) * len(x0) // WORLD_SIZE)
        results = {}
        for name, config in configs.items():
            torch.manual_seed(config["seed"])
            model = runtime.build_model(config)
            results[name] = weights_and_gradients_after_one_step(
                DistributedDataParallel(model), model, make_optimizer(name, model, config), x0[half], t[half],
                noise[half], config)
        torch.save(results, result_path.format(rank=rank))
    finally:
        dist.destroy_process_group()


def one_step_single_process(name, config, x0, t, noise):
    """Return (weights, gradients) after one single-process train_step on (x0, t, noise), from the seed's model."""
    torch.manual_seed(config["seed"])
    model = runtime.build_model(config)
    return weights_and_gradients_after_one_step(model, model, make_optimizer(name, model, config), x0, t, noise, config)


def max_difference(first, second):
    """Return the largest absolute difference between two {name: tensor} dicts over all entries."""
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


# ----------------------------------------------------------------------------- torchrun runs


def test_torchrun_run_prints_and_writes_from_rank_0_only(two_epoch_run):
    """Rank 1 prints nothing and writes nothing in --out; rank 0 writes each grid once and one checkpoint.

    Outputs written by both ranks would have the same names, so the folder's listing alone could not tell:
    the records of what each rank opened for writing do.
    """
    process, out_dir, (rank0, rank1) = two_epoch_run
    assert rank1["stdout"] == ""
    assert paths_in(rank1["written"], out_dir) == []
    assert "2 process(es)" in rank0["stdout"] and "done: 2 epochs, 8 steps" in rank0["stdout"]
    assert process.stdout.count("done: 2 epochs") == 1
    assert sorted(os.listdir(out_dir)) == ["checkpoint.pt", "config.json", "loss.csv", "samples_epoch_001.png",
                                          "samples_epoch_002.png"]
    rank0_writes = paths_in(rank0["written"], out_dir)
    assert str(out_dir / ".lock") in rank0_writes  # rank 0 alone holds --out
    for epoch in (1, 2):
        assert rank0_writes.count(str(out_dir / f"samples_epoch_{epoch:03d}.png")) == 1
    assert rank0_writes.count(str(out_dir / "checkpoint.pt")) == 2  # one atomic rename per epoch


def test_torchrun_checkpoint_loads_and_counts_global_steps(two_epoch_run):
    """The checkpoint loads (weights_only) into the configured model: 2 epochs of 64 // (8 * 2) = 4 steps each.

    Its loss log has one (rank-averaged) loss per global step, not one per rank.
    """
    _, out_dir, _ = two_epoch_run
    checkpoint = checkpoints.load_checkpoint(str(out_dir / "checkpoint.pt"))
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["step"]) == (2, 0, 2 * STEPS_PER_EPOCH)
    assert len(checkpoint["losses"]) == 2 * STEPS_PER_EPOCH
    runtime.build_model(checkpoint["config"]).load_state_dict(checkpoint["model"])
    checkpoints.model_from_checkpoint(checkpoint, torch.device("cpu"), "fp32")
    assert [step for step, _, _ in read_losses(out_dir)] == list(range(2 * STEPS_PER_EPOCH))


def test_torchrun_loss_decreases_over_two_epochs(two_epoch_run):
    """The mean loss of epoch 2 is below that of epoch 1, and the last step's loss below the first's."""
    _, out_dir, _ = two_epoch_run
    losses = read_losses(out_dir)
    mean_of_epoch = [sum(loss for _, e, loss in losses if e == epoch) / STEPS_PER_EPOCH for epoch in (0, 1)]
    assert mean_of_epoch[1] < mean_of_epoch[0] - 0.05
    assert losses[-1][2] < losses[0][2] - 0.1


def test_torchrun_disk_full_stops_every_rank_with_one_line_and_resume_reaches_the_uninterrupted_weights(
        tmp_path, two_epoch_run):
    """Rank 0's disk fills as it saves epoch 2's checkpoint (of 3): the run stops with rank 0's one-line error, rank
    1 adds no traceback of its own (it learns of the failure, where it used to die in the collective that follows,
    "Connection closed by peer"), and epoch 1's checkpoint stays; --resume --epochs 2 then ends at step 2 * 4 with
    the weights of the uninterrupted 2-epoch run.

    Every step's images, timesteps and noise depend on (seed, rank, step) only, and all ranks load the same
    checkpoint, so the resumed run repeats the uninterrupted one bit for bit.
    """
    _, uninterrupted_dir, _ = two_epoch_run
    out_dir = tmp_path / "run"
    failed = torchrun([*TINY_FLAGS, "--epochs", "3", "--out", str(out_dir)], tmp_path / "first",
                      {"FAIL_SAVE_AT_STEP": str(2 * STEPS_PER_EPOCH)})
    assert failed.returncode != 0, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], failed.stderr
    assert "[rank1]" not in failed.stderr and "RankFailed" not in failed.stderr, failed.stderr
    assert checkpoints.load_checkpoint(str(out_dir / "checkpoint.pt"))["step"] == STEPS_PER_EPOCH
    resumed = torchrun([*TINY_FLAGS, "--resume", "--epochs", "2", "--out", str(out_dir)], tmp_path / "second")
    assert_finished(resumed)
    rank0, rank1 = rank_records(tmp_path / "second")
    assert f"at epoch 2, step {STEPS_PER_EPOCH}" in rank0["stdout"] and rank1["stdout"] == ""
    assert resumed.stdout.count("resumed from") == 1
    final = checkpoints.load_checkpoint(str(out_dir / "checkpoint.pt"))
    expected = checkpoints.load_checkpoint(str(uninterrupted_dir / "checkpoint.pt"))
    assert (final["epoch"], final["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert max_difference(final["model"], expected["model"]) == 0.0
    assert max_difference(final["ema"], expected["ema"]) == 0.0
    assert final["losses"] == expected["losses"]


def test_torchrun_failure_other_than_a_write_on_rank_0_stops_rank_1_without_a_traceback_of_its_own(tmp_path):
    """Rank 0's preview grid raises a RuntimeError at epoch 2 (of 3), as running out of GPU memory would: rank 0
    shows that error, rank 1 learns of it and exits without a line of its own (it used to die in the next
    collective with gloo's "Connection closed by peer" traceback), and epoch 1's checkpoint stays."""
    out_dir = tmp_path / "run"
    failed = torchrun([*TINY_FLAGS, "--epochs", "3", "--out", str(out_dir)], tmp_path / "rec",
                      {"FAIL_GRID_AT_EPOCH": "2"})
    assert failed.returncode != 0, failed.stderr
    assert "RuntimeError: injected failure while sampling the preview grid" in failed.stderr, failed.stderr
    assert not any(line.startswith("[rank1]") for line in failed.stderr.splitlines()), failed.stderr
    assert "RankFailed:" not in failed.stderr and "Connection closed" not in failed.stderr, failed.stderr
    assert checkpoints.load_checkpoint(str(out_dir / "checkpoint.pt"))["step"] == STEPS_PER_EPOCH


def test_torchrun_download_finishes_before_any_rank_reads_the_data(tmp_path):
    """With --download, every rank reads the split rank 0 downloaded, not the bundled one it found first.

    The stand-in download takes a second; a rank that read the data folder without waiting would train on the
    10,000-digit test split while rank 0 trains on the training split.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with open(os.path.join(BUNDLED_DATA, name), "rb") as source, open(data_dir / name, "wb") as copy_:
            copy_.write(source.read())
    process = torchrun([*TINY_FLAGS, "--epochs", "1", "--download", "--data-dir", str(data_dir),
                        "--out", str(tmp_path / "run")], tmp_path / "records", {"FAKE_DOWNLOAD_DELAY_S": "1"})
    assert_finished(process)
    images_read = [sorted({os.path.basename(path) for path in paths_in(record["read"], data_dir) if "images" in path})
                   for record in rank_records(tmp_path / "records")]
    assert images_read == [["train-images-idx3-ubyte.gz"]] * WORLD_SIZE


def test_plain_run_mentions_processes_only_as_one_process(tmp_path):
    """`python train.py` (no torchrun) runs as before: its output says "1 process(es)" and nothing else about
    ranks, process groups or a per-process batch multiplier."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    process = subprocess.run([sys.executable, TRAIN_SCRIPT, *TINY_FLAGS, "--grid-samples", "0", "--epochs", "1",
                              "--out", str(tmp_path / "run")], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert_finished(process)
    output = process.stdout + process.stderr
    assert "1 process(es)" in output
    assert not re.search(r"rank|distributed|torchrun|gloo|nccl|world|batch \d+ x", output, re.IGNORECASE), output


# ----------------------------------------------------------------------------- process groups in-process


def test_ranks_end_with_identical_weights_and_ema_after_training_on_disjoint_halves(tmp_path, two_epoch_run):
    """After 8 DDP steps (2 epochs) both ranks hold bit-identical weights and EMA weights.

    DDP all-reduces the gradients, so both ranks' Adam steps start from the same numbers; the EMA, updated
    from those weights on each rank, then agrees too. Each epoch the ranks use disjoint halves of the images.
    The steps are train.py's own: rank 0 ends with the weights of the torchrun run's checkpoint, whose loss log
    holds the mean of the two ranks' losses at each step.
    """
    config = tiny_config()
    result_path = str(tmp_path / "rank{rank}.pt")
    steps = 2 * STEPS_PER_EPOCH
    spawn(train_steps_on_rank, tmp_path, config, steps, result_path)
    rank0, rank1 = (torch.load(result_path.format(rank=rank), weights_only=True) for rank in range(WORLD_SIZE))
    initial = runtime.build_model(config).state_dict()
    assert max_difference(rank0["model"], initial) > 1e-3  # the weights did move
    assert max_difference(rank0["model"], rank1["model"]) == 0.0
    assert max_difference(rank0["ema"], rank1["ema"]) == 0.0
    torchrun_checkpoint = checkpoints.load_checkpoint(str(two_epoch_run[1] / "checkpoint.pt"))
    assert max_difference(rank0["model"], torchrun_checkpoint["model"]) == 0.0
    assert max_difference(rank0["ema"], torchrun_checkpoint["ema"]) == 0.0
    assert torchrun_checkpoint["losses"] == ((rank0["losses"] + rank1["losses"]) / WORLD_SIZE).tolist()
    for epoch in range(2):
        images = [torch.cat([batch for e, batch in record["used_images"] if e == epoch]) for record in (rank0, rank1)]
        assert len(set(images[0].tolist()) | set(images[1].tolist())) == 2 * STEPS_PER_EPOCH * config["batch_size"]


def test_one_ddp_step_on_halves_equals_one_step_on_whole_batch(tmp_path):
    """Two ranks with B/2 images each, one step, equal one process with all B (same t and noise per image).

    L = mean over B of ||eps - eps_theta||^2 = (L_first_half + L_second_half) / 2, so its gradient is the mean of
    the ranks' gradients, which DDP all-reduces. Checked on the gradients and the weights of an SGD step
    (w - lr * g: the step scales with g) and on the weights after train.py's Adam step with gradient clipping.
    Adam alone could not tell a mean from a sum: its step g / sqrt(g^2) ignores the scale of g.

    Tolerances (float32): both sides add the same 16 images' contributions in different orders (within a rank,
    then across ranks), so gradients of size <= 0.5 agree to a few ulps (ulp(0.5) = 6e-8; measured 1.2e-7):
    GRADIENT_ATOL = 1e-6. Adam divides by |g| + 1e-8, so a gradient entry that cancels to ~1e-7 turns its ~1e-8
    rounding into a visible change of its step (measured 5e-7 of a step of up to lr = 3e-3): ADAM_WEIGHT_ATOL =
    1e-5, 0.3 % of a step. A summed (x2) or non-reduced gradient differs by more than 100 times these.
    """
    gradient_atol, adam_weight_atol = 1e-6, 1e-5
    batch_size = 16
    configs = {"adam": tiny_config(), "sgd": tiny_config(grad_clip=0)}
    generator = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch_size, 1, 16, 16, generator=generator) * 2 - 1
    t = torch.randint(0, 20, (batch_size,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    result_path = str(tmp_path / "rank{rank}.pt")
    spawn(one_step_on_half, tmp_path, configs, x0, t, noise, result_path)
    ranks = [torch.load(result_path.format(rank=rank), weights_only=True) for rank in range(WORLD_SIZE)]
    whole = {name: one_step_single_process(name, config, x0, t, noise) for name, config in configs.items()}
    for rank in ranks:
        assert max_difference(rank["sgd"][1], whole["sgd"][1]) < gradient_atol
        assert max_difference(rank["sgd"][0], whole["sgd"][0]) < gradient_atol
        assert max_difference(rank["adam"][0], whole["adam"][0]) < adam_weight_atol

    ddp_sgd_weights, ddp_gradients = ranks[0]["sgd"]
    doubled_gradients = {name: 2 * gradient for name, gradient in whole["sgd"][1].items()}
    assert max_difference(ddp_gradients, doubled_gradients) > 100 * gradient_atol
    summed_config = tiny_config(grad_clip=0, lr=2 * configs["sgd"]["lr"])  # SGD: lr 2a on L steps as lr a on 2L
    assert max_difference(ddp_sgd_weights, one_step_single_process("sgd", summed_config, x0, t, noise)[0]) > \
        100 * gradient_atol
    half = batch_size // WORLD_SIZE
    own_half = {name: one_step_single_process(name, config, x0[:half], t[:half], noise[:half])
                for name, config in configs.items()}
    assert max_difference(ddp_gradients, own_half["sgd"][1]) > 100 * gradient_atol
    assert max_difference(ranks[0]["adam"][0], own_half["adam"][0]) > 100 * adam_weight_atol
