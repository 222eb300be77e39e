"""AMC's search: the MAC count, the action wall (the budget is always met), the reward, determinism, the command."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobilenet_jax import MobileNetV1, MobileNetV2, summarize
from mobilenet_jax.compression import amc, prune, prune_cli
from mobilenet_jax.errors import UserError
from mobilenet_jax.weights import checkpoint
from tests import variables as random_init
from tests.test_distributed import PROFILE
from tests.test_prune import trained_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def test_mac_counter_equals_the_built_models_count():
    """The search's bilinear count against summarize(), which counts the built network layer by layer."""
    rng = np.random.default_rng(0)
    for model, size in ((MobileNetV1(num_classes=10, width=0.5), 40), (MobileNetV2(num_classes=7, width=0.35), 33)):
        counter = amc.MacCounter(model, size)
        assert counter.full == summarize(model, size).macs
        for _ in range(3):
            widths = [int(rng.integers(min(8, c), c + 1)) for c in prune.group_widths(model)]  # V1 keeps >= 8
            try:
                pruned = prune.resize(model, widths)
            except UserError:  # a residual group split: not a network
                continue
            assert counter(widths) == summarize(pruned, size).macs


@pytest.fixture(scope="module")
def tiny():
    """A 4-block MobileNetV1 0.5 with non-trivial BatchNorm, and labels it predicts on half of the images."""
    model = MobileNetV1(num_classes=4, width=0.5, profile=PROFILE)
    variables = trained_like(model, size=SIZE)
    images = jax.random.normal(jax.random.key(3), (160, SIZE, SIZE, 3))
    labels = np.array(jnp.argmax(random_init.logits(model, variables, images), -1))
    labels[::2] = np.random.default_rng(0).integers(0, 4, 80)  # the unpruned model is not perfect
    return model, variables, images, labels


def _env(tiny, budget=0.5, **settings):
    model, variables, images, labels = tiny
    return amc.Environment(
        model, variables, cost=amc.MacCounter(model, SIZE), budget=budget, refit_images=images[:64],
        images=images[64:], labels=labels[64:], settings=amc.SearchSettings(**settings),
    )  # fmt: skip


def test_action_wall_meets_the_budget_whatever_the_agent_asks(tiny):
    env = _env(tiny, budget=0.4)
    full = env.cost(env.full)
    assert env.layers == [0, 1, 2, 3, 4]  # stem and every block's outputs
    rng = np.random.default_rng(1)
    for actions in [np.ones(5), np.zeros(5), *rng.uniform(0, 1, (20, 5))]:
        widths = list(env.full)
        for t, action in enumerate(actions):
            widths[env.layers[t]] = env.wall(t, widths, action)
        assert env.cost(widths) <= 0.4 * full
        for i in env.layers:  # multiples of 8 within [0.2, 1] of the layer (or the whole layer)
            assert widths[i] in env.allowed[i] and widths[i] >= 0.2 * env.full[i]
            assert widths[i] % 8 == 0 or widths[i] == env.full[i]
    # Asking for everything: the wall gives the early layers all it can, and the budget binds.
    greedy = list(env.full)
    for t in range(5):
        greedy[env.layers[t]] = env.wall(t, greedy, 1.0)
    assert greedy[0] == env.full[0] and env.cost(greedy) <= 0.4 * full
    last, allowed = env.layers[-1], env.allowed[env.layers[-1]]
    wider = allowed[allowed.index(greedy[last]) + 1]  # the last layer could not keep one step more
    assert env.cost([wider if i == last else w for i, w in enumerate(greedy)]) > 0.4 * full
    with pytest.raises(UserError, match="below what keeping 20% of every layer costs"):
        _env(tiny, budget=0.01)
    for budget in (0.0, 1.0, 1.5, True):
        with pytest.raises(UserError, match=r"budget must be in \(0, 1\)"):
            _env(tiny, budget=budget)


def test_reward_is_the_accuracy_of_the_pruned_refitted_model(tiny):
    """The search scores zeroed channels at the unpruned shapes; prune() slices them. Same network, same score."""
    model, variables, images, labels = tiny
    env = _env(tiny)
    widths = [16, 16, 24, 48, 64]  # stem, blocks; 64 refit images x 8 x 8 rows refit the early layers
    pruned, pruned_variables, report = prune.prune(
        model, variables, prune.resize(model, widths), refit_images=images[:64]
    )
    assert any(after < before for before, after in report.values())  # the refit changed layers
    logits = np.asarray(random_init.logits(pruned, pruned_variables, images[64:]))
    assert env.reward(widths) == np.mean(np.argmax(logits, -1) == labels[64:])
    keeps = prune.keep_indices(model, variables, prune.resize(model, widths))
    zeroed = prune.zeroed(model, variables, keeps, images[:64])
    np.testing.assert_allclose(random_init.logits(model, zeroed, images[64:]), logits, atol=2e-5 * np.abs(logits).max())


def test_v2_search_prunes_the_stem_and_expansions_and_scores_what_prune_builds():
    """MobileNetV2: the searched layers are the stem and the expansions; the reward is again the sliced model's."""
    from tests.test_prune import V2_TABLE

    model = MobileNetV2(num_classes=4, width=0.5, block_table=V2_TABLE, dropout_rate=0.0)
    variables = trained_like(model, size=SIZE)
    images = jax.random.normal(jax.random.key(5), (96, SIZE, SIZE, 3))
    labels = np.array(jnp.argmax(random_init.logits(model, variables, images), -1))
    labels[::3] = 0
    env = amc.Environment(
        model, variables, cost=amc.MacCounter(model, SIZE), budget=0.6, refit_images=images[:64],
        images=images[64:], labels=labels[64:], settings=amc.SearchSettings(episodes=1, warmup=2),
    )  # fmt: skip
    groups = prune.groups(model)
    assert [prune.describe_group(groups[i]) for i in env.layers] == [
        "stem",
        *(f"group of block_{i}/conv_pw" for i in range(1, 6)),
    ]
    result = amc.search(env, progress=False)
    assert result.cost <= 0.6
    pruned, pruned_variables, _ = prune.prune(
        model, variables, prune.resize(model, result.widths), refit_images=images[:64]
    )
    logits = np.asarray(random_init.logits(pruned, pruned_variables, images[64:]))
    assert result.reward == np.mean(np.argmax(logits, -1) == labels[64:])


def test_search_is_deterministic_for_a_seed_and_logs_every_episode(tiny, tmp_path):
    runs = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        env = _env(tiny, episodes=3, warmup=2, seed=seed)
        result = amc.search(env, tmp_path / f"{name}.jsonl", progress=False)
        log = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        assert [r["episode"] for r in log] == list(range(5)) and [r["phase"] for r in log] == ["warmup"] * 2 + [
            "learn"
        ] * 3
        assert all(r["cost"] <= 0.5 for r in log)
        assert result.reward == max(r["reward"] for r in log) and result.cost <= 0.5
        assert env.reward(result.widths) == result.reward
        runs.append([(r["widths"], r["reward"]) for r in log])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_search_command_writes_the_model_the_log_and_the_plot(tiny, tmp_path, image_folder):
    model = MobileNetV1(num_classes=4, width=0.25, profile=PROFILE)
    checkpoint.save_model(tmp_path / "source", model, trained_like(model, size=32))
    command = [sys.executable, "-m", "mobilenet_jax.prune", str(tmp_path / "source"), str(tmp_path / "out")]
    flags = ["--search=amc", "--macs=0.5", "--episodes=2", "--warmup=2", "--refit_images=32", "--reward_images=32"]
    (tmp_path / "folder.py").write_text(
        "from mobilenet_jax.training import config_defaults\n\n\ndef get_config():\n"
        "    config = config_defaults.quickstart(config_defaults.base_config())\n"
        f"    config.dataset, config.data_dir = 'folder', {str(image_folder)!r}\n    return config\n"
    )
    config = [f"--config={tmp_path / 'folder.py'}"]
    result = subprocess.run(command + flags + config, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Searched 4 episodes" in result.stdout and "uniform:" in result.stdout
    record = json.load(open(tmp_path / "out" / "search.json"))
    assert record["searched"]["cost"] <= 0.5 and record["held_out_images"] == 32
    assert len(open(tmp_path / "out" / "search.jsonl").readlines()) == 4
    assert open(tmp_path / "out" / "keep_ratios.svg").read().count("<rect") == 2 * len(record["layers"])
    pruned, _ = checkpoint.load_any(tmp_path / "out")
    assert prune.group_widths(pruned) == tuple(record["searched"]["widths"])
    assert summarize(pruned, 32).macs <= 0.5 * summarize(model, 32).macs
    # Bad input: one sentence, before any work.
    flags = types.SimpleNamespace(macs=0.5, refit_images=32, reward_images=32, episodes=1, warmup=1, seed=0)
    with pytest.raises(UserError, match="already holds a model"):
        prune_cli.search(model, None, None, str(tmp_path / "out"), flags, 32)
    with pytest.raises(UserError, match="needs --config naming the training dataset"):
        prune_cli.search(model, None, None, str(tmp_path / "new"), flags, 32)
    with pytest.raises(UserError, match=r"budget must be in \(0, 1\), got 1.5"):
        prune_cli.search(model, None, None, str(tmp_path / "new"), types.SimpleNamespace(macs=1.5), 32)
    with pytest.raises(UserError, match="needs a budget"):
        prune_cli.search(model, None, None, str(tmp_path / "new"), types.SimpleNamespace(macs=None), 32)
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metadata, "version", not_installed)
        latency_flags = types.SimpleNamespace(macs=None, latency=0.5)
        with pytest.raises(UserError, match=r"needs the LiteRT interpreter: pip install -e '.\[export\]'"):
            prune_cli.search(model, None, None, str(tmp_path / "new"), latency_flags, 32)
    assert not os.path.exists(tmp_path / "new")


def test_latency_model_recovers_linear_timings_is_cached_and_walls_the_search(tiny, tmp_path, monkeypatch):
    """Timings that are an exact linear function of the counts: the fit must reproduce them on unseen widths."""
    from mobilenet_jax.deployment import latency

    model = tiny[0]
    counter = amc.MacCounter(model, SIZE)
    truth = np.array([0.05, 2e-6, 1e-6, 4e-6, 3e-7, 5e-6])  # constant, full, pointwise, depthwise, classifier, writes
    timed = []

    def fake_measure(pruned, image_size, kind, threads):
        timed.append(prune.group_widths(pruned))
        return float(truth[0] + truth[1:] @ counter.features(prune.group_widths(pruned)))

    monkeypatch.setattr(latency, "measure", fake_measure)
    monkeypatch.setenv("MOBILENET_JAX_CACHE", str(tmp_path))
    predict = latency.fit(model, SIZE, count=12)
    assert len(timed) == 12 and len(set(timed)) >= 10
    for widths in ([16, 8, 16, 24, 40], [8, 32, 64, 64, 128], [16, 24, 40, 56, 72]):
        expected = truth[0] + truth[1:] @ counter.features(widths)
        assert predict(widths) == pytest.approx(expected, rel=1e-4)
    assert latency.fit(model, SIZE, count=12).samples == predict.samples and len(timed) == 12  # from the cache
    env = amc.Environment(
        model, tiny[1], cost=predict, budget=0.5, refit_images=tiny[2][:64], images=tiny[2][64:], labels=tiny[3][64:]
    )
    rng = np.random.default_rng(2)
    for actions in [np.ones(5), *rng.uniform(0, 1, (10, 5))]:
        widths = list(env.full)
        for t, action in enumerate(actions):
            widths[env.layers[t]] = env.wall(t, widths, action)
        assert predict(widths) <= 0.5 * predict(env.full)
    uniform = amc.uniform_widths(env)
    assert 0.4 * predict(env.full) < predict(uniform) <= 0.5 * predict(env.full)
