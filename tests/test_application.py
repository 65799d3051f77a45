"""The application layer: typed acquisitions, physics, the case type, the method
registry's metadata and the module graph (no import circles)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.errors import ReconError

ROOT = Path(__file__).resolve().parent.parent


def _phantom(n=32):
    yy, xx = np.mgrid[:n, :n] / n - 0.5
    return ((xx ** 2 + yy ** 2) < 0.16).astype(np.float32) * 0.6 + 0.2


# -- module graph ---------------------------------------------------------------
def _module_imports(path: Path, modules: dict) -> set[str]:
    """Modules of recon/forward_models that ``path`` imports, at module level or lazily inside
    functions: for ``from a import b`` the submodule ``a.b`` when it is one, else ``a``."""
    tree = ast.parse(path.read_text())
    found = set()
    own = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = own.split(".")
                base = ".".join(parts[:len(parts) - node.level])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in ("recon", "forward_models")}
    return found


def _graph():
    modules = {}
    for pkg in ("recon", "forward_models"):
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = f
    graph = {}
    for name, f in modules.items():
        deps = set()
        for imp in _module_imports(f, modules):
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def test_no_import_circles_between_modules():
    graph = _graph()
    assert "recon.harness" not in graph  # split into single / compare / outputs / execute
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycles, cycles


def test_only_cli_reads_argparse():
    def reads_argparse(f):
        return "argparse" in _module_imports(f, {}) or "import argparse" in f.read_text() \
            or "Namespace" in f.read_text()

    files = list((ROOT / "recon").rglob("*.py")) + list((ROOT / "forward_models").rglob("*.py"))
    users = [f.relative_to(ROOT).as_posix() for f in files if f.name != "cli.py" and reads_argparse(f)]
    assert users == []


def test_forward_models_never_imports_recon():
    graph = _graph()
    bad = {n: sorted(d for d in deps if d.startswith("recon")) for n, deps in graph.items()
           if n.startswith("forward_models")}
    assert not any(bad.values()), bad


# -- typed acquisitions ----------------------------------------------------------
def test_ct_acquisition_validates_and_describes():
    from recon.acquisition import CTAcquisition

    acq = CTAcquisition(views=23, photons=1e5, window="-1000,1000")
    assert acq.window == (-1000.0, 1000.0) and acq.noisy
    assert acq.describe() == {"views": 23, "limited_angle": None, "geometry": "parallel", "photons": 1e5,
                              "noise": None, "window": [-1000.0, 1000.0], "fov": None}
    assert "source_distance" in CTAcquisition(views=8, geometry="fan").describe()
    assert not CTAcquisition(views=8).noisy
    for bad, msg in (({"views": 0}, "--views"), ({"views": 2.5}, "--views"), ({"geometry": "cone"}, "--geometry"),
                     ({"photons": -1}, "--photons"), ({"window": "5,1"}, "--window"),
                     ({"photons": 1e5, "noise": 0.1}, "either --photons or --noise")):
        with pytest.raises(ReconError, match=msg):
            CTAcquisition(**bad)
    with pytest.raises(ReconError, match="--views N is required"):
        CTAcquisition().operator(16)


def test_acquisitions_build_their_operators():
    from forward_models import CartesianMRI, FanBeamCT, Inpainting, ParallelBeamCT, operator_kind
    from recon.acquisition import CTAcquisition, InpaintAcquisition, MRIAcquisition

    assert isinstance(CTAcquisition(views=8).operator(16), ParallelBeamCT)
    fan = CTAcquisition(views=8, geometry="fan").operator(16)
    assert isinstance(fan, FanBeamCT) and operator_kind(fan) == "ct"
    mri = MRIAcquisition(mask="equispaced", accel=4).operator(16, seed=0)
    assert isinstance(mri, CartesianMRI) and mri.in_shape == (16, 16)
    box = InpaintAcquisition(mask="box", box_fraction=0.25).operator(16)
    assert isinstance(box, Inpainting) and float(box.mask.mean()) == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ReconError, match="--mask KIND and --accel R"):
        MRIAcquisition().operator(16)
    with pytest.raises(ReconError, match="--mask must be one of"):
        MRIAcquisition(mask="spiral")
    assert InpaintAcquisition(mask="random").describe()["keep_ratio"] == 0.2
    assert "box_fraction" not in InpaintAcquisition(mask="random").describe()


# -- physics and the one Measurement type ----------------------------------------------
def test_physics_simulates_with_the_noise_model_and_reports_sigma():
    from forward_models import ParallelBeamCT, view_angles
    from forward_models.physics import LowDoseCT, Measurement, Physics, RelativeGaussian

    op = ParallelBeamCT(32, view_angles(12))
    x = torch.from_numpy(_phantom())[None]
    clean = Physics(op).simulate(x, torch.Generator().manual_seed(0))
    assert isinstance(clean, Measurement) and clean.sigma_y == 0 and torch.equal(clean.y, op.A(x))
    g = Physics(op, RelativeGaussian(0.05)).simulate(x, torch.Generator().manual_seed(0))
    rms = float(op.A(x).pow(2).mean().sqrt())
    assert g.sigma_y == pytest.approx(0.05 * rms, rel=1e-5)
    assert float((g.y - clean.y).std()) == pytest.approx(g.sigma_y, rel=0.1)
    p = Physics(op, LowDoseCT(1e4, (-1000, 1000), 1.0)).simulate(x, torch.Generator().manual_seed(0))
    assert p.info["model"] == "poisson" and p.sigma_y == pytest.approx(float((p.y - clean.y).std()), rel=1e-6)
    more = Physics(op, LowDoseCT(1e6, (-1000, 1000), 1.0)).simulate(x, torch.Generator().manual_seed(0))
    assert more.sigma_y < p.sigma_y / 5  # 100x the photons: ~10x less noise


def test_masked_gaussian_noise_leaves_unmeasured_entries_zero():
    from forward_models.physics import Physics, RelativeGaussian
    from recon.acquisition import MRIAcquisition

    op = MRIAcquisition(mask="equispaced", accel=4).operator(32)
    meas = Physics(op, RelativeGaussian(0.1)).simulate(torch.from_numpy(_phantom())[None],
                                                       torch.Generator().manual_seed(1))
    assert meas.y.is_complex() and bool((meas.y[..., op.mask == 0] == 0).all()) and meas.sigma_y > 0


# -- the case type: one slice or a stack ---------------------------------------------
def test_a_stack_of_slices_travels_the_same_path_as_one_slice():
    from recon.acquisition import CTAcquisition
    from recon.case import Source
    from recon.tasks import TASKS

    task, acq = TASKS["ct"], CTAcquisition(views=10)
    stack = np.stack([_phantom(), _phantom()[::-1].copy(), _phantom().T.copy()]) * 1000 - 1000
    truth = task.prepare(Source(image=stack, path="v.npy", fmt="image", slice_index=4), 24, units="hu")
    assert truth.x.shape == (3, 24, 24) and truth.batch().shape == (3, 24, 24)
    assert truth.source.slice_indices == [4, 5, 6]
    meas = task.simulate(truth, acq, "cpu", seed=0)
    assert meas.y.shape[0] == 3
    one = task.prepare(Source(image=stack[1], path="s.npy", fmt="image"), 24, units="hu")
    assert np.array_equal(one.x, truth.x[1])
    assert torch.equal(task.simulate(one, acq, "cpu", seed=0).y[0], meas.y[1])
    native = task.prepare(Source(image=stack, path="v.npy", fmt="image"), None, units="hu")
    assert np.allclose(native.to_units(native.x), np.clip(stack, -1000, 1000), atol=1e-3)


def test_hu_round_trip_through_the_intensity_conventions():
    from recon.preprocess import hu_to_unit, unit_to_hu

    hu = np.array([[-1000.0, 0.0], [400.0, 1000.0]], np.float32)
    assert np.array_equal(unit_to_hu(hu_to_unit(hu)), hu)
    assert hu_to_unit(np.array([3000.0]))[0] == 1.0  # clipped by the window
    assert np.allclose(hu_to_unit(hu, (-160, 240)), np.clip((hu + 160) / 400, 0, 1))


# -- registry metadata ---------------------------------------------------------------
def test_method_metadata_drives_listing_and_planning():
    from forward_models import CartesianMRI, view_angles, ParallelBeamCT
    from recon.execute import check_samples, plan_methods
    from recon.methods import METHODS, has_decomposition, prior_methods
    from recon.tasks import TASKS

    assert prior_methods() == ["dps", "score", "score-fast"]
    assert all(METHODS[n].stochastic for n in prior_methods())
    assert METHODS["score"].needs_decompose and not METHODS["tv"].needs_prior
    assert METHODS["fbp"].tasks == ("ct",) and "mri" in METHODS["tv"].tasks
    ct = ParallelBeamCT(16, view_angles(4))
    assert has_decomposition(ct) and has_decomposition(CartesianMRI(torch.ones(8, 8)))
    assert not has_decomposition(ct @ ct.H)  # a composition has no A = P(mask) T
    with pytest.raises(ReconError, match="does not apply to"):
        METHODS["score"].check(ct @ ct.H)
    with pytest.raises(ReconError, match="method 'fbp' does not apply to mri"):
        plan_methods(["fbp"], TASKS["mri"], {})
    runs = plan_methods(["tv", "score-fast"], TASKS["ct"], {}, noisy=True)
    assert runs[0].options["lam"] == 3e-4 and runs[1].score and not runs[0].score
    check_samples(4, runs)  # one stochastic method is enough
    with pytest.raises(ReconError, match="deterministic"):
        check_samples(2, runs[:1])


def test_run_settings_reject_empty_method_names_and_bad_numbers():
    from recon.execute import RunSettings

    assert RunSettings(methods="fbp, tv").methods == ["fbp", "tv"]
    for kw, msg in (({"methods": "fbp,,tv"}, "method names"), ({"methods": "tv", "samples": 0}, "--samples"),
                    ({"methods": "tv", "size": 2}, "--size")):
        with pytest.raises(ReconError, match=msg):
            RunSettings(**kw)


def test_score_methods_take_the_task_explicitly():
    """The task selects the prior's per-task defaults; without it the operator's kind does."""
    from recon.score_methods import _defaults

    class P:
        meta = {"sampler_defaults": {"ct": {"score-fast": {"n_steps": 7}},
                                     "inpaint": {"score-fast": {"n_steps": 9}}}}

    from forward_models import ParallelBeamCT, view_angles

    op = ParallelBeamCT(16, view_angles(4))
    assert _defaults(P(), "score-fast", op, None)["n_steps"] == 7
    assert _defaults(P(), "score-fast", op, "inpaint")["n_steps"] == 9


def test_kspace_noise_is_estimated_from_the_sampled_periphery():
    from recon.tasks import MRITask

    g = torch.Generator().manual_seed(0)
    H, W = 64, 48
    yy, xx = torch.meshgrid(torch.arange(H) - H / 2, torch.arange(W) - W / 2, indexing="ij")
    signal = 50 * torch.exp(-(yy ** 2 + xx ** 2) / 20.0)  # energy at the centre, as in k-space
    noise = 0.05 * torch.complex(torch.randn(H, W, generator=g), torch.randn(H, W, generator=g))
    mask = (torch.rand(H, W, generator=g) > 0.3).float()
    y = ((signal + noise) * mask)[None, None]
    assert MRITask.estimate_kspace_noise(y, mask) == pytest.approx(0.05, rel=0.15)
    assert MRITask.estimate_kspace_noise(y, torch.zeros(H, W)) == 0.0  # nothing sampled outside: unknown
