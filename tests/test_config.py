import re
from pathlib import Path

import pytest

from pipeline.config import JobConfig, load_config
from operators.errors import ConfigError, ExitCode

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["local.yaml", "cluster-v100.yaml"])
def test_shipped_configs_load(name):
    config = load_config(ROOT / "configs" / name)
    assert isinstance(config, JobConfig)


def test_overrides_are_parsed_as_yaml():
    config = load_config(ROOT / "configs" / "local.yaml",
                         ["recognize.concurrency=[1, 4]", "rasterize.dpi=200", "ray.address=null"])
    assert config.recognize.concurrency == (1, 4)
    assert config.rasterize.dpi == 200
    assert config.ray.address is None
    # a format given twice is one format (the documents rows had recorded [pdf, pdf, txt])
    assert load_config(None, ["output.exports=[pdf, pdf, txt]"]).output.exports == ("pdf", "txt")


def test_a_number_names_a_model_folder_and_a_truth_value_is_no_number():
    assert load_config(ROOT / "configs" / "local.yaml", ["recognize.model=2024"]).recognize.model == "2024"
    assert load_config(ROOT / "configs" / "local.yaml", ["recognize.split_long_lines=no"]).recognize.split_long_lines is False
    for override in ("recognize.num_beams=true", "recognize.line_batch_size=yes", "rasterize.num_cpus=on"):
        with pytest.raises(ConfigError, match=rf"{override.partition('=')[0]} \(--set\): .*truth value"):
            load_config(ROOT / "configs" / "local.yaml", [override])


def test_config_is_frozen():
    config = load_config(ROOT / "configs" / "local.yaml")
    with pytest.raises(Exception):
        config.rasterize.dpi = 100


@pytest.mark.parametrize("override, named", [
    ("recognize.beams=4", "recognize.beams"),
    ("nonsense.key=1", "nonsense"),
    ("rasterize.dpi=10", "rasterize.dpi"),
    ("recognize.model.x=3", re.escape("recognize.model (--set): Input should be a valid string")),
    ("recognize.languages=fr", re.escape("recognize.languages (--set): Input should be a valid tuple (write a list")),
    # an unknown section is the override's own (it had been named without "(--set)")
    ("recognise.model=x", re.escape("unknown key 'recognise' (--set)")),
    # what is wrong with a range, said (both had been "is not a range of pages from 1")
    ("rasterize.pages=3-1", re.escape("'3-1' ends before it starts (write 1-3)")),
    ("rasterize.pages=0", re.escape("'0' names page 0; pages are counted from 1")),
])
def test_bad_keys_and_values_are_named(override, named):
    with pytest.raises(ConfigError, match=named) as info:
        load_config(ROOT / "configs" / "local.yaml", [override])
    assert info.value.exit_code == ExitCode.bad_args


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("detect:\n  colums: 2\n")
    with pytest.raises(ConfigError, match="unknown key 'detect.colums'"):
        load_config(path)
    path.write_text("detect:\n  # columns: 2\n")  # a section with its keys commented out holds nothing
    assert load_config(path) == JobConfig()


def test_a_key_given_twice_in_a_config_file_is_refused_where_it_is(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a job config that set recognize.model twice had run
    with whichever came last, a training config likewise. Keys a merge (``<<: *defaults``) brings may be given
    again."""
    from pipeline.train.config import load_train_config

    path = tmp_path / "twice.yaml"
    path.write_text("recognize:\n  model: printed\n  num_beams: 2\n  model: handwritten\n")
    with pytest.raises(ConfigError, match=r"(?s)the key 'model' is given twice, first on line 2.*line 4"):
        load_config(path)
    # a nested merge of a merge (PyYAML rewrites merged mappings in place) and a list as a key are no repeated keys
    path.write_text("x-root: &root {k: 0}\nx-base: {inner: &base {<<: *root, k: 1}}\ny: {<<: *base}\n")
    with pytest.raises(ConfigError, match="unknown key 'x-root'"):
        load_config(path)
    path.write_text("? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):  # PyYAML's own refusal; it had been a TypeError
        load_config(path)
    with pytest.raises(ConfigError, match="the key 'a' is given twice"):
        load_config(None, ["recognize.x={a: 1, a: 2}"])
    path.write_text("ray:\n  num_cpus: 2\n  num_cpus: 0x2\n")  # one key as YAML builds them
    with pytest.raises(ConfigError, match="the key 'num_cpus' is given twice, first on line 2"):
        load_config(path)
    path.write_text("ray:\n  address: \x07\n")  # where a character YAML refuses is, named by the file
    with pytest.raises(ConfigError, match=f"in \"{re.escape(str(path))}\", position"):
        load_config(path)
    with pytest.raises(ConfigError, match="the key 'steps' is given twice"):
        path.write_text("steps: 10\nsteps: 20\n")
        load_train_config(path)
    path.write_text("recognize:\n  <<: {num_beams: 2, languages: [fr]}\n  num_beams: 4\n")
    assert load_config(path).recognize.num_beams == 4


def test_a_training_config_error_is_one_line_per_key(tmp_path):
    """pydantic's own text had run over several lines with links to its documentation."""
    from pipeline.train.config import load_train_config

    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError) as info:
        load_train_config(tmp_path / "empty.yaml")
    assert "\n" not in str(info.value) and "output_dir: Field required; work_dir: Field required" in str(info.value)


def test_half_precision_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="precision"):
        load_config(ROOT / "configs" / "local.yaml", ["recognize.device=cpu", "recognize.precision=fp16"])


def test_bf16_on_the_cpu_is_left_to_the_recognizer_to_check():
    """Whether a CPU has native bf16 is known where the recognizer runs, not where the config is read."""
    config = load_config(ROOT / "configs" / "local.yaml", ["recognize.device=cpu", "recognize.precision=bf16"])
    assert config.recognize.precision == "bf16"


def test_int8_on_a_gpu_is_refused():
    with pytest.raises(ConfigError, match="int8 is for the CPU"):
        load_config(ROOT / "configs" / "local.yaml", ["recognize.device=cuda", "recognize.precision=int8"])


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs" / "local.yaml", ["rasterize.dpi"])
    with pytest.raises(ConfigError, match="not valid YAML: expected the node content"):
        load_config(ROOT / "configs" / "local.yaml", ["rasterize.pages=["])


def test_pages_takes_any_text_and_names_what_is_wrong_with_it(tmp_path, capsys):
    """``--pages`` is given to the config as a string whatever it holds (a quote once broke its YAML)."""
    from pipeline.cli import main

    assert main(["run", str(tmp_path), "--output", str(tmp_path / "out"), "--dry-run", "--pages", "1'"]) == 2
    # named by the option given: it had been "rasterize.pages (--set)"
    assert 'error: --pages: page selection "1\'": "1\'" is not N, N-M or N-' in capsys.readouterr().err
    # a YAML list is a selection too (it had been "Input should be a valid string")
    (tmp_path / "pages.yaml").write_text("rasterize:\n  pages: [1, 3-4]\n")
    assert load_config(tmp_path / "pages.yaml").rasterize.pages == "1,3-4"


@pytest.mark.parametrize("overrides, cpus, refused", [
    (["recognize.concurrency=2"], 2, True),  # both CPUs held by actors: layout would never run
    (["recognize.concurrency=[2,4]"], 2, True),  # an autoscaling pool starts at its minimum
    (["recognize.concurrency=[1,4]"], 2, False),
    (["recognize.concurrency=2", "recognize.num_cpus=0.5"], 2, False),
    (["recognize.concurrency=2"], 3, False),
    ([], 1, True),
    (["recognize.concurrency=2", "ray.address=auto"], 2, False),  # a cluster may scale up
])
def test_a_local_recognizer_pool_must_leave_a_cpu_for_pages(overrides, cpus, refused):
    from pipeline.job import check_cpus_left_for_pages

    config = load_config(None, overrides)
    if refused:
        with pytest.raises(ConfigError, match="rasterize and layout need 1 more"):
            check_cpus_left_for_pages(config, cpus)
    else:
        check_cpus_left_for_pages(config, cpus)
    check_cpus_left_for_pages(config, cpus, mode="detect")  # no recognizer, nothing to refuse


def test_a_local_recognizer_pool_cannot_ask_for_gpus_the_machine_lacks():
    """It had waited for ever, logging every 35 s that no node fits."""
    from pipeline.job import check_gpus_for_recognizers

    with pytest.raises(ConfigError, match="recognize.num_gpus=1, but the local Ray instance has 0 GPU"):
        check_gpus_for_recognizers(load_config(None, ["recognize.num_gpus=1"]), 0.0)
    check_gpus_for_recognizers(load_config(None, ["recognize.num_gpus=1"]), 1.0)
    check_gpus_for_recognizers(load_config(None, ["recognize.num_gpus=1", "ray.address=auto"]), 0.0)  # a cluster


@pytest.mark.timeout(180)
def test_a_local_recognizer_pool_cannot_ask_for_a_gpu_type_the_machine_lacks(ray_local, tmp_path):
    """`--config configs/cluster-v100.yaml` on a machine with another GPU, or none, had waited for ever: its
    recognizer actors ask for accelerator_type V100, which no local node offers (the GPU count was checked)."""
    from conftest import text_page, write_pdf
    from pipeline.job import run_job

    write_pdf(tmp_path / "letter.pdf", [text_page(["A line of text"])])
    config = load_config(None, ["recognize.accelerator_type=V100", "recognize.max_new_tokens=4"])
    with pytest.raises(ConfigError, match="recognize.accelerator_type=V100, but the local Ray instance has no GPU: "):
        run_job([str(tmp_path / "letter.pdf")], str(tmp_path / "out"), config)
    assert not (tmp_path / "out").exists()  # it had been left holding the lock file and _staging/


def test_the_gpu_type_check_names_the_local_types_and_leaves_clusters_alone():
    from pipeline.job import check_accelerator_for_recognizers

    config = load_config(None, ["recognize.accelerator_type=V100"])
    with pytest.raises(ConfigError, match="GPUs are T4: set recognize.accelerator_type=null"):
        check_accelerator_for_recognizers(config, {"GPU": 1.0, "accelerator_type:T4": 1.0})
    check_accelerator_for_recognizers(config, {"GPU": 1.0, "accelerator_type:V100": 1.0})
    # a machine without a GPU had been said to have GPUs "of no known type"
    with pytest.raises(ConfigError, match="local Ray instance has no GPU: set recognize.accelerator_type=null"):
        check_accelerator_for_recognizers(config, {"CPU": 2.0, "memory": 1e9})
    with pytest.raises(ConfigError, match="local Ray instance's GPUs are of no known type"):
        check_accelerator_for_recognizers(config, {"CPU": 2.0, "GPU": 1.0})  # a GPU Ray could not name
    check_accelerator_for_recognizers(config, {}, mode="detect")  # no recognizer
    check_accelerator_for_recognizers(load_config(None, ["recognize.accelerator_type=V100", "ray.address=auto"]),
                                      {})  # a cluster: its autoscaler may add V100 nodes


@pytest.mark.parametrize("overrides, message", [
    (["recognize.concurrency=0"], "recognize.concurrency \\(--set\\): needs at least 1 actor"),
    (["recognize.concurrency=[2, 1]"], "recognize.concurrency \\(--set\\): \\(min, max\\) needs 1 <= min <= max"),
    (["recognize.languages=[xx]"], "recognize.languages \\(--set\\): no word list for language"),
    (["rasterize.pages=0"], "rasterize.pages \\(--set\\): page selection '0'"),
    (["ray.object_store_memory_mb=64"], "ray.object_store_memory_mb \\(--set\\): Input should be greater than or "
                                        "equal to 75"),
    (["recognize.foo=1"], "unknown key 'recognize.foo' \\(--set\\)"),
])
def test_values_ray_would_refuse_later_are_refused_first_and_set_values_are_marked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_mistyped_command_lines_get_one_line_and_exit_code_2(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\n".encode("latin-1"))
    cases = [
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--export", "alto,foo", "--dry-run"],
         "--export: unknown format(s) foo; choose from alto,page,hocr,txt,pdf,mets"),
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "-c", str(tmp_path / "latin1.yaml"),
          "--dry-run"], f"cannot read config {tmp_path / 'latin1.yaml'}"),
        (["synth", "docs", "--output", str(tmp_path / "a.pdf" / "docs")], f"the output {tmp_path / 'a.pdf' / 'docs'} "
                                                                          "cannot be written"),
        # each had been taken (a URI written under ./s3:/, an empty output into the working folder, options that
        # did nothing) or ended in a traceback
        (["synth", "docs", "--output", "s3://bucket/synth"], "--output 's3://bucket/synth': this command writes to a "
                                                             "local folder"),
        (["inspect", str(tmp_path / "a.pdf"), "--output", "s3://bucket/i"], "this command writes to a local folder"),
        (["synth", "docs", "--output", str(tmp_path / "s"), "--dpi", "0"], "synth docs: dpi must be from 50 to 600"),
        (["synth", "lines", "--output", str(tmp_path / "s"), "--dpi", "300"], "--dpi is for synth docs"),
        (["run", str(tmp_path / "a.pdf"), "--output", "", "--dry-run"], "--output is empty"),
        (["show", ""], "show: the output name is empty"),
        (["run", str(tmp_path / "a.pdf"), "--output", "s3://", "--dry-run"], "'s3://' names no bucket or folder"),
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--pdfa", "--dry-run"],
         "pdfa makes the searchable PDF a PDF/A: export pdf as well"),
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--export", ",", "--dry-run"],
         "--export ',' names no format"),
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--pages", "", "--dry-run"],
         "page selection '': '' is not N, N-M or N-"),
        # what a run refuses, the dry run refuses too (it had exited 0)
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--log-json", str(tmp_path / "no" / "x"),
          "--dry-run"], f"cannot write the --log-json file {tmp_path / 'no' / 'x'}: there is no folder"),
        (["run", str(tmp_path / "a.pdf"), "--output", str(tmp_path / "out"), "--set", "recognize.num_gpus=64",
          "--dry-run"], "recognize.num_gpus=64, but the local Ray instance has"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.parametrize("command, says", [("run", "the whole job"), ("detect", "layout only"),
                                            ("show", "print the documents"), ("eval", "CER/WER of a model")])
def test_each_command_says_what_it_does_under_its_own_help(command, says, capsys):
    """``detect --help`` had read exactly as ``run --help``: the usage and the options, not what the command does."""
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage, description = capsys.readouterr().out.split("\n\n")[:2]
    assert description.replace("\n", " ").startswith(says), description


def test_an_invalid_setting_names_the_config_as_given():
    """The default config had been named by its full path, in a submitted job that of Ray's copy of the working dir
    (/tmp/ray/session_.../runtime_resources/working_dir_files/_ray_pkg_.../configs/local.yaml)."""
    with pytest.raises(ConfigError, match=re.escape("invalid configuration in the default configs/local.yaml and the "
                                                    "command line: unknown key 'recognize.bogus' (--set)")):
        load_config(None, ["recognize.bogus=1"])
    with pytest.raises(ConfigError, match=re.escape("invalid configuration in cluster-v100.yaml and the command line")):
        load_config("cluster-v100.yaml", ["recognize.bogus=1"])
