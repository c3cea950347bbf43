"""vLLM's rules by release (lorasurgery.targets.VLLM_RULES; docs/verify.md "vLLM releases").

The release table itself (each range of releases reads use_rslora, rank_pattern and alpha_pattern
one way, the ranges in order, the CLI's help naming the newest), `vllm==RELEASE` parsed and refused,
and through the CLI on a tiny real Llama with a real PEFT adapter that uses all three features
(rsLoRA, rank_pattern, alpha_pattern), every factor randomised: vLLM 0.32 serves it as trained, vLLM
0.7.0 – 0.31 scales the patterned modules by c = (α/√r)/s_m (s_m PEFT's own LoraLayer.scaling),
0.6.5 – 0.6.6 refuses it by name, and `export --for vllm` writes what every release reads alike.
"""

from __future__ import annotations

import json
import math

import pytest
from clihelp import DID_NOT_LAND, LANDED, run_cli, tree_digest, verify
from factories import make_adapter, make_llama, peft_delta_weights

from lorasurgery.cli.options import TARGET_RELEASES
from lorasurgery.errors import OptionError
from lorasurgery.targets import (
    ANY,
    REFUSED,
    VLLM_KNOWN,
    VLLM_NEWEST,
    VLLM_RELEASES,
    VLLM_RULES,
    parse_target,
    vllm_rules,
)

CONFIG = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "r": 4,
    "lora_alpha": 8,
    "use_rslora": True,
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"down_proj": 3},
}
KNOWN = "0.6.4, 0.6.5 – 0.6.6, 0.7.0 – 0.31.x, 0.32.x"


# ------------------------------------------------------------------------------- the table


def test_every_range_reads_every_feature_once_and_the_ranges_follow_each_other():
    for releases in VLLM_RELEASES:
        rules = [r for r in VLLM_RULES if releases.first in r.releases]
        assert sorted(r.feature for r in rules) == ["alpha_pattern", "rank_pattern", "use_rslora"], releases
        assert all(releases.last in r.releases for r in rules), releases  # no rule splits a range
        assert all(r.source.startswith("vllm/lora/") and " read in " in r.source for r in rules)
    for older, newer in zip(VLLM_RELEASES, VLLM_RELEASES[1:]):
        assert older.last < newer.first
    assert VLLM_NEWEST == VLLM_RELEASES[-1] and VLLM_NEWEST.last[2] == ANY
    # the CLI's help names the newest release and the known ones without importing this module
    assert f"({VLLM_NEWEST})" in TARGET_RELEASES and f"known: {VLLM_KNOWN}" in TARGET_RELEASES
    assert vllm_rules(VLLM_RELEASES[1])["use_rslora"].reading == REFUSED


@pytest.mark.parametrize(
    "text, releases",
    [
        ("vllm", "0.32.x"),
        ("vllm==0.32", "0.32.x"),
        ("vllm==0.32.0", "0.32.x"),
        ("vllm==0.31", "0.7.0 – 0.31.x"),
        ("vllm==0.7", "0.7.0 – 0.31.x"),
        ("vllm==0.20.0", "0.7.0 – 0.31.x"),
        ("vllm==0.6.5", "0.6.5 – 0.6.6"),
        ("vllm==0.6.6.post1", "0.6.5 – 0.6.6"),
        ("vllm==0.6.4", "0.6.4"),
        ("sglang", None),
        ("llama.cpp", None),
        ("peft", None),
    ],
)
def test_targets_parse(text, releases):
    target = parse_target(text)
    assert target.release_text == releases and str(target) == text
    assert parse_target(target) is target


@pytest.mark.parametrize(
    "text, said",
    [
        ("vllm==0.6", "no rules known for vLLM 0.6 as a whole"),  # 0.6.4 and 0.6.5 read it otherwise
        ("vllm==0.33", "no rules known for vLLM 0.33"),
        ("vllm==0.5.1", "no rules known for vLLM 0.5.1"),
        ("vllm==latest", "'latest' is not a release number"),
        ("sglang==0.4", "only vllm's rules depend on its release"),
        ("tgi", "unknown target 'tgi'"),
    ],
)
def test_unknown_releases_are_option_errors_naming_the_known_ones(text, said):
    with pytest.raises(OptionError) as error:
        parse_target(text)
    assert said in str(error.value)
    if text.startswith("vllm"):
        assert KNOWN in str(error.value)


# ------------------------------------------------------------------------------- through the CLI


def label(c: float) -> str:
    if math.isclose(c, 1.0, rel_tol=1e-6):
        return "landed"
    return "applied twice" if abs(c - 2) < 0.01 else f"scaled by {c:.4g}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify-releases")
    base = make_llama(root / "base")
    adapter = make_adapter(base, root / "adapter", seed=5, **CONFIG)
    _, scales = peft_delta_weights(base, adapter)  # PEFT's own scaling per module
    return root, base, adapter, scales


def test_patterns_and_rslora_land_on_0_32_and_the_older_releases_are_said(llama):
    _, base, adapter, scales = llama
    code, report = verify(base, adapter, adapter, "--target", "vllm")
    assert code == LANDED and report["landed"], report
    assert report["target"] == "vllm" and report["target_release"] == "0.32.x"
    assert "0.32.x, the newest release known" in report["target_rule"]
    others = {d["releases"]: d for d in report["other_releases"]}
    assert set(others) == {"0.6.4", "0.6.5 – 0.6.6", "0.7.0 – 0.31.x"}
    assert (
        "use_rslora is refused" in others["0.6.5 – 0.6.6"]["summary"] and others["0.6.5 – 0.6.6"]["refused"]
    )
    alpha, r = CONFIG["lora_alpha"], CONFIG["r"]
    for releases, scale in (("0.7.0 – 0.31.x", alpha / math.sqrt(r)), ("0.6.4", alpha / r)):
        expected = {m: scale / s for m, s in scales.items() if not math.isclose(scale / s, 1.0)}
        assert others[releases]["scaled"] == pytest.approx(expected), releases
    assert "alpha_pattern is not read" in others["0.7.0 – 0.31.x"]["summary"]
    assert "use_rslora" not in " ".join(others["0.7.0 – 0.31.x"]["rules"])  # 0.7 – 0.31 read it as 0.32
    text = run_cli("verify", base, adapter, adapter, "--target", "vllm").stdout
    assert "other releases: vLLM 0.7.0 – 0.31.x: rank_pattern is not read" in text


def test_patterns_given_to_vllm_0_31_are_scaled(llama):
    """vLLM 0.7.0 – 0.31 read one lora_alpha/√r: every patterned module is off by c = (α/√r) / s_m."""
    _, base, adapter, scales = llama
    code, report = verify(base, adapter, adapter, "--target", "vllm==0.31")
    assert code == DID_NOT_LAND and report["target_release"] == "0.7.0 – 0.31.x"
    vllm_scale = CONFIG["lora_alpha"] / math.sqrt(CONFIG["r"])
    found = set()
    for check in report["checks"]:
        c = vllm_scale / scales[check["tensor"].removesuffix(".weight")]
        assert check["verdict"] == label(c), check
        found.add(check["verdict"])
        if check["verdict"] != "landed":
            assert check["scale"] == pytest.approx(c), check
    assert "landed" in found and any(v.startswith("scaled by") for v in found), found
    assert "0.32.x" in {d["releases"] for d in report["other_releases"]}  # it would serve PEFT's update


def test_rslora_is_refused_by_vllm_0_6_5(llama):
    _, base, adapter, _ = llama
    code, report = verify(base, adapter, adapter, "--target", "vllm==0.6.5")
    assert code == DID_NOT_LAND
    assert any(
        "vLLM does not yet support RSLoRA." in p and "_validate_features" in p for p in report["config"]
    )
    assert {c["verdict"] for c in report["checks"]} == {"refused"}
    assert all("0.6.5 – 0.6.6 does not load the adapter" in c["detail"] for c in report["checks"])


def test_text_is_skipped_where_the_release_refuses_the_adapter(llama, tmp_path):
    _, base, adapter, _ = llama
    text = tmp_path / "text.txt"
    text.write_text("the release decides what the server computes " * 2)
    code, report = verify(base, adapter, adapter, "--target", "vllm==0.6.5", "--text", text)
    assert code == DID_NOT_LAND and "use_rslora is refused" in report["text"]["skipped"], report["text"]
    code, report = verify(base, adapter, adapter, "--target", "sglang")  # no releases for the others
    assert report["target_release"] is None and report["other_releases"] == []


def test_export_for_vllm_lands_on_every_release(llama, tmp_path):
    _, base, adapter, _ = llama
    outputs = {}
    for target in ("vllm", "vllm==0.6.5"):  # the release changes the report, not what is written
        out = tmp_path / target.replace("==", "-")
        result = run_cli("export", adapter, "--for", target, "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["target"] == "vllm" and any("every release known" in n for n in report["notes"])
        outputs[target] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert outputs["vllm"] == outputs["vllm==0.6.5"]
    out = tmp_path / "vllm"
    for target in ("vllm", "vllm==0.31", "vllm==0.6.5", "vllm==0.6.4"):
        code, report = verify(base, adapter, out, "--target", target)
        assert code == LANDED and report["landed"], (target, report)
        assert report["other_releases"] == []  # every release computes the same from it
    text = run_cli("verify", base, adapter, out, "--target", "vllm==0.31").stdout
    assert "every vLLM release known (0.6.4 – 0.32.x) computes the same" in text


def test_inspect_for_a_release(llama):
    _, _, adapter, _ = llama
    exits = {
        t: run_cli("inspect", adapter, "--for", t).exit_code for t in ("vllm", "vllm==0.31", "vllm==0.6.5")
    }
    assert exits == {"vllm": 0, "vllm==0.31": 3, "vllm==0.6.5": 3}
    result = run_cli("inspect", adapter, "--for", "vllm", "--json")
    report = json.loads(result.stdout)
    assert report["target_release"] == "0.32.x" and report["status"] == "pass"
    scale = next(r for r in report["rules"] if r["id"] == "scale")
    assert "vLLM 0.7.0 – 0.31.x" in scale["action"] and "every release reads alike" in scale["action"]
    report = json.loads(run_cli("inspect", adapter, "--for", "vllm==0.6.5", "--json").stdout)
    scale = next(r for r in report["rules"] if r["id"] == "scale")
    assert scale["status"] == "fixed" and "use_rslora is refused" in scale["requirement"]
    assert "use_rslora written off" in scale["action"]


@pytest.mark.parametrize("command", ["verify", "inspect", "export"])
def test_an_unknown_release_is_a_usage_error_naming_the_known_ones(llama, tmp_path, command):
    _, base, adapter, _ = llama
    out = tmp_path / "out"
    args = {
        "verify": ["verify", base, adapter, adapter, "--target", "vllm==0.6"],
        "inspect": ["inspect", adapter, "--for", "vllm==0.6"],
        "export": ["export", adapter, "--for", "vllm==0.6", "-o", out],
    }[command]
    before = tree_digest(adapter)
    result = run_cli(*args)
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert "'vllm==0.6'" in result.stderr and KNOWN in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists() and tree_digest(adapter) == before
