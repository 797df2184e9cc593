"""The mtp-jax command: every subcommand has --help, generate runs, bad input exits 2 with one clear line."""

import subprocess
import sys

import pytest

from mtp_jax import cli

SUBCOMMANDS = ["generate", "params", "imatrix", "perplexity", "quantize", "convert", "info"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_generate_random_weights_with_compare(capsys):
    assert cli.main(["generate", "--config", "mtp_jax/configs/glm4moe-tiny.yaml", "--prompt-ids", "1,2,3;4,5",
                     "--max-new-tokens", "6", "--compare", "--repeats", "1", "-K", "2"]) == 0
    out = capsys.readouterr().out
    assert "[0] prompt [1, 2, 3] -> [" in out and "[1] prompt [4, 5]" in out
    assert "MTP speculative, K=2" in out and "tok/s" in out and "speedup" in out and "outputs identical" in out


def test_generate_bad_token_id_is_one_clear_line(capsys):
    assert cli.main(["generate", "--config", "glm4moe-tiny", "--prompt-ids", "1,2,100000"]) == 2
    err = capsys.readouterr().err
    assert "out of vocabulary" in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [(["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
                                           (["--prompt-ids", "1,2;"], "prompt 1 is empty")])
def test_generate_checks_budget_and_prompts_before_measuring(capsys, extra, message):
    """An empty prompt or a zero budget is one line, before auto mode measures the pieces (nothing is compiled)."""
    assert cli.main(["generate", "--config", "glm4moe-tiny", "--prompt-ids", "1,2,3", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "measuring" not in err


@pytest.mark.parametrize("argv", [
    ["quantize", "mtp_jax/assets/glm4moe-stdlib-f16.gguf", "{d}", "Q8_0"],
    ["imatrix", "-f", "README.md", "-o", "{d}"],
    ["imatrix", "-f", "README.md", "-o", "{d}/x.gguf", "--head-output", "{d}"],
    ["perplexity", "-f", "README.md", "--kl-divergence-base", "{d}"],
    ["generate", "--config", "glm4moe-tiny", "--trace", "{d}"],
], ids=["quantize", "imatrix", "imatrix-head", "perplexity-base", "generate-trace"])
def test_an_output_that_is_a_directory_is_one_line_before_the_work(capsys, tmp_path, argv):
    """Each command checks a file it will write before it works: a directory there used to fail at the final
    rename, after the whole run ("[Errno 21] Is a directory")."""
    assert cli.main([a.format(d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"{tmp_path}: is a directory; give a file name to write") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv,message", [
    (["generate", "--repeats", "-1"], "argument --repeats: must be >= 0, got -1"),
    (["generate", "--devices", "0"], "argument --devices: must be >= 1, got 0"),
    (["imatrix", "-f", "README.md", "-o", "x.gguf", "--chunk-size", "0"], "argument --chunk-size: must be >= 3"),
    (["imatrix", "-f", "README.md", "-o", "x.gguf", "--batch", "0"], "argument --batch/-b: must be >= 1, got 0"),
])
def test_counts_out_of_range_are_usage_errors(capsys, argv, message):
    """Counts that used to be taken silently (--repeats -1, --devices 0) or crash later (imatrix --chunk-size 0:
    ZeroDivisionError; --batch 0: an empty error) are argparse errors: exit 2, usage and one line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_imatrix_chunks_as_llama_imatrix():
    """--chunks: at most N chunks; negative means all (llama-imatrix's -1); 0 is an error, not all."""
    from mtp_jax.imatrix import make_chunks

    tokens = list(range(10, 60))
    assert make_chunks(tokens, 8, None, 2).shape == (2, 8)
    assert make_chunks(tokens, 8, None, -3).shape == make_chunks(tokens, 8, None).shape == (6, 8)
    with pytest.raises(ValueError, match="--chunks 0"):
        make_chunks(tokens, 8, None, 0)


def test_generate_checks_the_position_limit(capsys):
    args = ["generate", "--config", "glm4moe-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "100000", "-K", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "100007 positions" in err and "max_position_embeddings 4096" in err and "--max-new-tokens <= 4089" in err


def test_generate_announces_its_calls_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stderr, as if a terminal
    assert cli.main(["generate", "--config", "glm4moe-tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "3",
                     "--repeats", "1", "-K", "2"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("mtp-jax generate:")]
    head = "mtp-jax generate: MTP speculative, K=2: up to 3 tokens x 1 rows, call"
    assert len(err) == 2 and err[0].startswith(f"{head} 1/2 (compiles first) ... ") and err[0].endswith(" s")
    assert err[1].startswith(f"{head} 2/2 ... ")


def test_unknown_config_name_lists_the_bundled_ones(capsys):
    assert cli.main(["params", "--config", "glm-9"]) == 2
    err = capsys.readouterr().err
    assert "no bundled config of that name (bundled: " in err and " glm-4.5, glm-4.5-air, " in err


def test_params_json(capsys):
    assert cli.main(["params", "--config", "glm-4.5-air", "--json"]) == 0
    assert '"nextn_total"' in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "mtp_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout and "quantize" in out.stdout


def test_best_of_each_times_runs_in_alternation_and_keeps_each_fastest(monkeypatch):
    """generate --compare times MTP and plain decoding in turn (a slow spell of the machine hits both)."""
    from types import SimpleNamespace

    from mtp_jax import generate
    from mtp_jax.generate import best_of, best_of_each

    calls, clock = [], [0.0]
    monkeypatch.setattr(generate, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def run(name, seconds):  # each call takes its seconds of the (fake) wall clock
        it = iter(seconds)

        def call():
            calls.append(name)
            clock[0] += (t := next(it))
            return SimpleNamespace(seconds=t)
        return call

    a, b = best_of_each([run("a", [9, 3, 5]), run("b", [8, 6, 2])], repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"] and (a.seconds, b.seconds) == (3, 2)
    assert best_of(run("c", [1, 7]), repeats=0).seconds == 1  # no repeats: the compiling call's result
    calls.clear()  # short runs: rounds until min_seconds of wall time have passed
    a, b = best_of_each([run("a", [9, 3, 2, 1, 4]), run("b", [8, 2, 3, 2, 1])], repeats=1, min_seconds=12)
    assert len(calls) == 8 and (a.seconds, b.seconds) == (1, 2)  # 5 + 5 + 3 < 12 <= 16 after round 3
    calls.clear()
    best_of_each([run("d", [1] * 10)], repeats=2, min_seconds=100, max_rounds=4)
    assert len(calls) == 5  # the compiling call and max_rounds
