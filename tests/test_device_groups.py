"""A model spread over a group of GPUs per process (``--gpus-per-process``, issue 16): the group
arithmetic, the refusals, what the loader is given, and Ships and the Wanda statistics through
accelerate's dispatch hooks.

No GPU is needed (or used): ``torch.cuda`` is patched where a test needs GPUs to be visible, and
the dispatched model runs on CPU entries, so the per-layer device moves themselves are not run
here (docs/METHOD.md, "A model larger than a GPU").
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

import hsr_core.distributed as dist
from hsr_core.__main__ import main
from hsr_core.config import ConfigError, ModelSpec, ShipsConfig, WandaConfig, cuda_group
from hsr_core.data import Sample, builtin_calibration, with_typographic_images
from hsr_core.distributed import World, gpu_group, local_device
from hsr_core.models import ModelLoadError, check_placement, load_model, placement
from hsr_core.ships import ships_scores
from hsr_core.wanda import sequential_masks, wanda_norms

GIB = 2**30


def obvious_groups(size: int, k: int, visible: int) -> list[list[int]] | None:
    """Deal the visible GPUs out one by one: GPU g to process g // k while processes last; None
    when some process would get fewer than k."""
    groups: list[list[int]] = [[] for _ in range(size)]
    for g in range(visible):
        if g // k < size:
            groups[g // k].append(g)
    return groups if all(len(x) == k for x in groups) else None


def test_gpu_group_matches_dealing_out_the_gpus():
    for visible in range(0, 10):
        for size in range(1, 6):
            for k in range(1, 6):
                expected = obvious_groups(size, k, visible)
                for rank in range(size):
                    if expected is None:
                        with pytest.raises(ConfigError, match=f"take {size * k} GPUs"):
                            gpu_group(rank, size, k, visible)
                    else:
                        assert list(gpu_group(rank, size, k, visible)) == expected[rank]


def test_gpu_group_refusals_say_what_fits():
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        gpu_group(0, 1, 0, 8)
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        gpu_group(2, 2, 1, 8)
    msg = r"2 processes with --gpus-per-process 4 take 8 GPUs, but only 6 are visible"
    with pytest.raises(ConfigError, match=msg) as e:
        gpu_group(0, 2, 4, 6)
    assert "launch 1 process (accelerate launch --num_processes 1)" in str(e.value)
    assert "lower --gpus-per-process to 3" in str(e.value)
    with pytest.raises(ConfigError, match="1 process with .* only 2 are visible") as e:
        gpu_group(0, 1, 3, 2)
    assert "lower --gpus-per-process to 2" in str(e.value) and "launch" not in str(e.value)


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: make n CUDA GPUs look visible (GPU i with i + 1 GiB free)."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((i + 1) * GIB, 80 * GIB))

    return make


@pytest.fixture
def launched(monkeypatch):
    """``launched(rank, size)``: this process as rank ``rank`` of ``size`` on one machine."""

    def make(rank: int, size: int) -> None:
        monkeypatch.setattr(dist, "world", lambda: World(rank, size) if size > 1 else dist.SINGLE)
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(size))

    return make


def test_local_device_gives_each_rank_its_group(gpus, launched):
    gpus(8)
    for size, k in ((2, 4), (4, 2), (8, 1), (3, 2)):
        devices = []
        for rank in range(size):
            launched(rank, size)
            devices.append(local_device("auto", k))
            assert local_device("cuda", k) == devices[-1]
        groups = [cuda_group(d) for d in devices]
        assert groups == [tuple(range(r * k, r * k + k)) for r in range(size)]
    launched(0, 1)
    assert local_device("auto", 3) == "cuda:0,1,2"  # one process: GPUs 0..K-1
    assert local_device("auto", 1) == "cuda:0"
    assert local_device("auto") == "auto"  # as before: one process, every visible GPU
    assert local_device("cuda:5", 1) == "cuda:5" and local_device("cpu") == "cpu"
    launched(1, 2)
    assert local_device("auto") == "cuda:1"  # as before: several processes, a GPU each


def test_local_device_refusals(gpus, launched):
    gpus(4)
    launched(0, 2)
    with pytest.raises(ConfigError, match="take 6 GPUs, but only 4 are visible"):
        local_device("auto", 3)
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        local_device("auto", 0)
    with pytest.raises(ConfigError, match="--device cpu does not: use --device auto"):
        local_device("cpu", 2)
    gpus(0)
    with pytest.raises(ConfigError, match="needs GPUs, but none is visible .*drop --gpus-per"):
        local_device("auto", 2)
    assert local_device("auto", 1) == "auto"  # one GPU per process on the CPU: nothing to do


def test_cuda_group_parsing():
    assert cuda_group("cuda:3") == (3,) and cuda_group("cuda:0,2,1") == (0, 2, 1)
    assert cuda_group("cuda") is None and cuda_group("cpu") is None
    for bad in ("cuda:a", "cuda:1,", "cuda:-1", "cuda:1,1"):
        with pytest.raises(ConfigError):
            ModelSpec("x", device=bad)
    assert ModelSpec("x", device="cuda:2,3").device == "cuda:2,3"


def test_placement_restricts_max_memory_to_the_group(gpus):
    gpus(4)
    assert placement("cuda:2,3") == ("auto", {2: 3 * GIB, 3: 4 * GIB})
    assert placement("cuda") == ("auto", {i: (i + 1) * GIB for i in range(4)})
    assert placement("cuda:1") == ("cuda:1", None) and placement("cpu") == ("cpu", None)
    gpus(1)
    assert placement("cuda") == ("cuda", None)


class Stop(Exception):
    pass


@pytest.fixture
def from_pretrained_spy(monkeypatch):
    """Record what ``from_pretrained`` is given; load the model on the CPU instead (or, with
    ``stop``, stop there; with ``placed``, give it that ``hf_device_map``)."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained
    calls: list[dict] = []
    how: dict = {"stop": False, "placed": None}

    def spy(path, **kw):
        calls.append(kw)
        if how["stop"]:
            raise Stop
        model = real(path, **{**kw, "device_map": "cpu", "max_memory": None})
        if how["placed"] is not None:
            model.hf_device_map = how["placed"]
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    return calls, how


def test_load_model_is_given_the_group(gpus, from_pretrained_spy, cache_root):
    calls, how = from_pretrained_spy
    gpus(4)
    spec = ModelSpec("builtin:tiny-llama", dtype="float32", device="cuda:2,3")
    loaded = load_model(spec, cache_dir=cache_root)
    assert calls[-1]["device_map"] == "auto"
    assert calls[-1]["max_memory"] == {2: 3 * GIB, 3: 4 * GIB}
    assert loaded.device == torch.device("cpu")  # where the spy put it
    load_model(
        ModelSpec("builtin:tiny-llama", dtype="float32", device="cuda:1"), cache_dir=cache_root
    )
    assert calls[-1]["device_map"] == "cuda:1" and "max_memory" not in calls[-1]
    with pytest.raises(ModelLoadError, match="names GPU 4, but 4 are visible"):
        load_model(ModelSpec("builtin:tiny-llama", device="cuda:3,4"), cache_dir=cache_root)
    # a model too large for its group: accelerate would offload the rest; refused
    how["placed"] = {"model.embed_tokens": 2, "model.layers.0": 3, "model.layers.1": "disk"}
    with pytest.raises(ModelLoadError, match="does not fit GPUs 2, 3: .* on disk"):
        load_model(spec, cache_dir=cache_root)
    how["placed"] = {"model.embed_tokens": 2, "model.layers.0": 3, "model.layers.1": 3}
    load_model(spec, cache_dir=cache_root)  # within the group: accepted


def test_check_placement():
    model = torch.nn.Linear(2, 2)
    check_placement(model, {0: GIB}, "m")  # no device map: nothing placed
    model.hf_device_map = {"a": 0, "b": 1, "c": "cpu"}
    with pytest.raises(ModelLoadError, match="does not fit GPUs 0, 1: .* on cpu"):
        check_placement(model, {0: GIB, 1: GIB}, "m")
    check_placement(model, {0: GIB, 1: GIB, "cpu": GIB}, "m")
    check_placement(model, None, "m")  # a single device: not a group


def cli(tmp_path, cache_root) -> list[str]:
    return ["attribute", "--model", "builtin:tiny-llama", "--out", str(tmp_path), "--quiet"] + [
        "--cache-dir",
        str(cache_root),
    ]


def test_command_line_rank_loads_on_its_group(
    gpus, launched, from_pretrained_spy, tmp_path, cache_root
):
    calls, how = from_pretrained_spy
    how["stop"] = True
    gpus(8)
    argv = cli(tmp_path, cache_root)
    for rank in range(2):
        launched(rank, 2)
        with pytest.raises(Stop):
            main([*argv, "--gpus-per-process", "4"])
        assert calls[-1]["device_map"] == "auto"
        assert sorted(calls[-1]["max_memory"]) == list(range(4 * rank, 4 * rank + 4))
    launched(0, 1)
    with pytest.raises(Stop):
        main([*argv, "--gpus-per-process", "2"])
    assert sorted(calls[-1]["max_memory"]) == [0, 1]


def test_command_line_refusals(gpus, launched, tmp_path, cache_root, capsys):
    argv = cli(tmp_path, cache_root)
    gpus(4)
    launched(1, 2)
    assert main([*argv, "--gpus-per-process", "3"]) == 2
    assert "take 6 GPUs, but only 4 are visible" in capsys.readouterr().err
    assert main([*argv, "--gpus-per-process", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    gpus(0)
    launched(0, 1)
    assert main([*argv, "--gpus-per-process", "2"]) == 2
    assert "none is visible (a CPU run)" in capsys.readouterr().err


def per_module_map(loaded) -> dict[str, str]:
    """A device_map that places every decoder layer (and each module beside the layers) as its
    own entry, all on the CPU."""
    a = loaded.adapter
    ancestors = a.layers_path.split(".")
    out: dict[str, str] = {}
    prefix = ""
    for depth in range(len(ancestors)):
        module = loaded.model.get_submodule(prefix.rstrip("."))
        for name, _ in module.named_children():
            if name != ancestors[depth]:
                out[prefix + name] = "cpu"
        for name, _ in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            out[prefix + name] = "cpu"  # e.g. LLaVA-NeXT's image_newline
        prefix += ancestors[depth] + "."
    out |= {f"{a.layers_path}.{i}": "cpu" for i in range(a.num_layers)}
    return out


def run_all(loaded) -> dict[str, object]:
    probes = [Sample(s.prompt) for s in builtin_calibration().safety[:3]]
    if loaded.is_vision:
        probes = with_typographic_images(probes)
    calib = list(builtin_calibration().utility[:4])
    if loaded.is_vision:
        calib = calib[:2] + with_typographic_images(calib[2:])
    out: dict[str, object] = {}
    for metric, ablation in (("angle", "zero"), ("angle", "uniform"), ("kl", "zero")):
        cfg = ShipsConfig(num_samples=3, metric=metric, ablation=ablation, batch_size=3)
        out[f"{metric}-{ablation}"] = ships_scores(loaded, probes, cfg)
    wcfg = WandaConfig(num_samples=4, batch_size=2)
    out["norms"] = wanda_norms(loaded, calib, wcfg)
    masks = sequential_masks(loaded, calib, WandaConfig(num_samples=4, batch_size=2))
    out["sequential"] = {n: m.unpack("cpu") for n, m in masks.items()}
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # parameters
@pytest.mark.parametrize("name", ["builtin:tiny-llama", "builtin:tiny-llava-next"])
def test_dispatched_model_scores_as_the_plain_one(name, cache_root, monkeypatch):
    """Ships (replay, ablation hooks, both ablations, KL) and the statistics (one-shot and
    sequential) through accelerate's per-module dispatch hooks equal the plain model's."""
    from accelerate.hooks import AlignDevicesHook

    moved: list[int] = []
    real = AlignDevicesHook.pre_forward

    def counting(self, module, *args, **kwargs):
        moved.append(1)
        return real(self, module, *args, **kwargs)

    plain = load_model(name, cache_dir=cache_root)
    dispatched = load_model(name, cache_dir=cache_root)
    device_map = per_module_map(dispatched)
    dispatch_model(dispatched.model, device_map, main_device="cpu", force_hooks=True)
    a = dispatched.adapter
    assert all(hasattr(a.layers[i], "_hf_hook") for i in range(a.num_layers))
    assert hasattr(a.final_norm, "_hf_hook") and hasattr(dispatched.model, "_hf_hook")
    assert dispatched.device == torch.device("cpu")
    expected = run_all(plain)
    monkeypatch.setattr(AlignDevicesHook, "pre_forward", counting)
    got = run_all(dispatched)
    # every layer replay and forward went through the hooks that move a dispatched model's
    # inputs to each module's device
    assert len(moved) > 3 * a.num_layers
    for key in expected:
        assert same(got[key], expected[key]), key
