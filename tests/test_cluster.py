"""Running on a Ray cluster: the shipped cluster files, `ray job submit` against a real local head,
and the recognizer actor pool spread over a simulated multi-node GPU cluster.

The Ray processes these tests start live in subprocesses with their own RAY_TMPDIR: a test process
already joined to the session's ``ray_local`` cannot join a second cluster, and a head started with
the default temp dir would publish its address to every plain ``ray.init()`` on this machine. They
are stopped by process group, never with ``ray stop`` (which stops every Ray instance of the host).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pyarrow.dataset as ds
import pytest
import yaml

from conftest import text_page, write_pdf
from operators.errors import ConfigError, ExitCode, RecognizersLost

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
RAY_CLI = str(Path(sys.executable).with_name("ray"))
CLI_PREFIXES = (["trocr-pipeline"], ["python", "-m", "pipeline.cli"])
IMAGE_ROOT = Path("/home/ray/trocr-pipeline")  # where docker/Dockerfile puts the repo's configs
CPU_OVERRIDES = [  # the V100 config on a CPU-only test cluster with the tiny model
    "rasterize.dpi=150", "recognize.device=cpu", "recognize.precision=fp32", "recognize.num_gpus=0",
    "recognize.num_cpus=1", "recognize.concurrency=1", "recognize.torch_threads=1", "recognize.accelerator_type=null",
    "recognize.max_new_tokens=4", "recognize.line_batch_size=16",
]


# ---------------------------------------------------------------- offline checks of the shipped files


def _cli_arguments(command: list[str]) -> list[str]:
    """The arguments after the program, for a command that starts with one of the documented entrypoints."""
    for prefix in CLI_PREFIXES:
        if command[: len(prefix)] == prefix:
            return command[len(prefix):]
    raise AssertionError(f"entrypoint must start with one of {CLI_PREFIXES}: {command}")


def _parse_entrypoint(command: list[str]):
    from pipeline.cli import build_parser

    arguments = _cli_arguments(command)
    return build_parser(arguments).parse_args(arguments)


def _repo_config(path: Path | None) -> Path | None:
    """The repository file an entrypoint's --config names, in the image or in the working dir."""
    if path is None:
        return None
    return REPO / (path.relative_to(IMAGE_ROOT) if path.is_absolute() else path)


def _readme_job_commands() -> list[list[str]]:
    """Every `ray job submit ... -- <entrypoint>` in docker/README.md, continuation lines joined."""
    text = (DOCKER / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if line.strip().startswith("ray job submit")]
    return [command[command.index("--") + 1:] for command in commands]


def _makefile_debian_packages() -> list[str]:
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^DEBIAN_PACKAGES\s*:=(.*)$", text, re.MULTILINE)
    assert match, "Makefile has no DEBIAN_PACKAGES"
    return match.group(1).split()


def _dockerfile_apt_packages() -> set[str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    installs = re.findall(r"apt-get install ([^&\n]*)", text)
    return {word for install in installs for word in install.split() if not word.startswith("-")}


def test_cluster_config_is_fp16_on_one_gpu_per_actor():
    from pipeline.config import load_config

    recognize = load_config(REPO / "configs" / "cluster-v100.yaml").recognize
    assert (recognize.device, recognize.precision, recognize.num_gpus) == ("cuda", "fp16", 1)
    assert isinstance(recognize.concurrency, tuple), "the actor pool should autoscale with the cluster's GPUs"


def test_cluster_launcher_yaml_is_valid_for_ray_autoscaler():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((DOCKER / "cluster-v100.yaml").read_text())
    jsonschema.validate(cluster, schema)
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    gpu_types = [spec for spec in node_types.values() if spec["resources"].get("GPU")]
    assert gpu_types and all(spec["node_config"]["InstanceType"].startswith("p3") for spec in gpu_types)
    assert cluster["docker"]["image"] == _manifest_image()


def _manifest_image() -> str:
    job = yaml.safe_load((DOCKER / "rayjob-v100.yaml").read_text())
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_rayjob_manifest_has_the_v1_fields():
    from ray.runtime_env import RuntimeEnv

    job = yaml.safe_load((DOCKER / "rayjob-v100.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["entrypoint"]
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the driver and writer keep the head to themselves"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["groupName"] and workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == head["template"]["spec"]["containers"][0]["image"]
    # the autoscaler adds worker pods only for what it knows they offer: each recognizer actor's every resource
    from ray.autoscaler._private.kuberay.autoscaling_config import _node_type_from_group_spec

    from pipeline.config import load_config

    offered = _node_type_from_group_spec(workers, is_head=False)["resources"]
    recognize = load_config(REPO / "configs" / "cluster-v100.yaml").recognize
    assert offered["GPU"] >= recognize.num_gpus and offered["CPU"] >= recognize.num_cpus
    assert offered.get(f"accelerator_type:{recognize.accelerator_type}", 0) > 0


def test_documented_entrypoints_parse_with_the_cli():
    from pipeline.config import load_config

    job = yaml.safe_load((DOCKER / "rayjob-v100.yaml").read_text())
    entrypoints = [shlex.split(job["spec"]["entrypoint"]), *_readme_job_commands()]
    assert len(entrypoints) >= 3, "README should show ray job submit with and without a runtime env"
    for command in entrypoints:
        args = _parse_entrypoint(command)
        assert args.command in ("run", "detect") and args.output
        config = load_config(_repo_config(args.config), args.overrides)  # raises on a bad key or value
        assert config.recognize.num_gpus == 1, f"{command} does not run recognition on the GPUs"


def test_entrypoint_parser_rejects_unknown_programs():
    with pytest.raises(AssertionError, match="entrypoint must start"):
        _parse_entrypoint(["python", "my_script.py", "run"])


def test_dockerfile_installs_what_the_makefile_lists():
    packages = _dockerfile_apt_packages()
    missing = [package for package in _makefile_debian_packages() if package not in packages]
    assert not missing, f"docker/Dockerfile lacks Debian packages the Makefile installs: {missing}"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\S+-gpu", dockerfile, re.MULTILINE)
    assert re.search(r"^RUN pip install\b.*\s\.$", dockerfile, re.MULTILINE), "the image must install this package"


def test_the_image_folder_pip_writes_into_is_the_ray_users_whatever_the_builder():
    """`WORKDIR` had created /home/ray/trocr-pipeline: root's under kaniko, buildah and docker's classic builder, so
    `pip install -e .`, run as ray, could not write its egg-info there and the image failed to build."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", text, re.MULTILINE)
    before_ray = text[:text.index("\nUSER ray")]
    assert re.search(rf"mkdir -p {re.escape(workdir)}\b.*chown ray(:\w+)? {re.escape(workdir)}\b", before_ray), \
        f"{workdir} must be made and given to the ray user (as root) before USER ray"


def test_runtime_env_yaml_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((DOCKER / "runtime-env.yaml").read_text()))
    assert "/models/" in env["excludes"], "model folders must not be uploaded with the working dir"


def _working_dir_upload(root: Path) -> dict[str, int]:
    """What `ray job submit --working-dir ROOT --runtime-env docker/runtime-env.yaml` uploads, by Ray's own walk
    (its excludes, .gitignore and .rayignore): each file's path relative to ROOT and its size."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load((DOCKER / "runtime-env.yaml").read_text())["excludes"]
    files: dict[str, int] = {}

    def note(path: Path) -> None:
        if path.is_file():
            files[path.relative_to(root).as_posix()] = path.stat().st_size

    _dir_travel(root, [_get_excludes(root, excludes)], note, include_gitignore=True)
    return files


def test_the_working_dir_upload_is_the_code_without_history_models_or_outputs(tmp_path):
    """A checkout's .git had been uploaded with every `ray job submit --working-dir .` (341 MiB of 342 here; Ray
    refuses packages of 512 MiB and leaves .git out by itself only from 2.60), and unpacked on every node."""
    for name in (".git/objects/pack/pack-1.pack", ".git/HEAD", "models/printed/model.safetensors", "out/run/x.parquet",
                 "tests/test_x.py", "bench/b.py", "operators/x.py", "pipeline/cli.py", "configs/local.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert sorted(_working_dir_upload(tmp_path)) == ["configs/local.yaml", "operators/x.py", "pipeline/cli.py"]
    uploaded = _working_dir_upload(REPO)
    assert not [name for name in uploaded if name.startswith(".git/")]
    assert sum(uploaded.values()) < 20 * 2**20, sorted(uploaded.items(), key=lambda item: -item[1])[:5]


# ---------------------------------------------------------------- real Ray processes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _private_ray_env(ray_tmpdir: str) -> dict[str, str]:
    """This venv first on PATH (the job's `python`), a temp dir no other Ray on the host reads, and
    Ray's token authentication (on by default since 2.5x) with a token of its own instead of
    ~/.ray/auth_token."""
    return {**os.environ, "RAY_TMPDIR": ray_tmpdir, "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stop_process_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, then SIGKILL whatever outlives the grace period."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # the Jobs API address, http://host:port
    env: dict[str, str]

    def job(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`ray job <verb> --address <head> ...` from the repo root, output as text."""
        verb, *rest = args
        return subprocess.run([RAY_CLI, "job", verb, "--address", self.dashboard, *rest], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def status(self, submission_id: str) -> str:
        """What `ray job status` says: 'Job 'ID' succeeded|failed' and the status message."""
        result = self.job("status", "--log-color", "false", submission_id)
        return result.stdout + result.stderr

    def ended(self, submission_id: str, timeout: float = 300) -> str:
        """What `ray job status` says once the job has ended."""
        deadline = time.monotonic() + timeout
        while not re.search(rf"Job '{submission_id}' (succeeded|failed|stopped)", said := self.status(submission_id)):
            assert time.monotonic() < deadline, f"{submission_id} still running after {timeout} s: {said}"
            time.sleep(1)
        return said


@pytest.fixture(scope="module")
def ray_head():
    """A real `ray start --head` with the dashboard's job server, two CPUs, no GPU."""
    ray_tmpdir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = _private_ray_env(ray_tmpdir)
    starts = []
    try:
        for _ in range(3):  # a port found free may be taken before Ray binds it (by the other test process's Ray)
            dashboard_port = _free_port()
            starts.append(subprocess.Popen(
                [RAY_CLI, "start", "--head", f"--port={_free_port()}", "--num-cpus=2", "--num-gpus=0",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
                 "--disable-usage-stats"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            ))
            output, _ = starts[-1].communicate(timeout=120)
            if starts[-1].returncode == 0:
                break
            _stop_process_group(starts[-1].pid)
        assert starts[-1].returncode == 0, output[-3000:]
        yield RayHead(f"http://127.0.0.1:{dashboard_port}", env)
    finally:
        for start in starts:
            _stop_process_group(start.pid)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def job_documents(synthetic_documents) -> list[Path]:
    return synthetic_documents[:2]


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, job_documents) -> Path:
    """The documents alone in one folder: the job's 'shared storage' input."""
    folder = tmp_path_factory.mktemp("cluster-inputs")
    for document in job_documents:
        shutil.copy(document, folder)
    return folder


def _expected_pages(documents: list[Path]) -> list[tuple[str, int]]:
    from pipeline.synth.docs import load_ground_truth

    return sorted((path.name, page["page"]) for path in documents for page in load_ground_truth(path)["pages"])


def _read_output(output: Path) -> tuple[list[dict], list[tuple[str, int]]]:
    documents = ds.dataset(output / "documents", format="parquet").to_table().to_pylist()
    pages = ds.dataset(output / "pages", format="parquet").to_table(columns=["source", "page"]).to_pylist()
    return documents, [(Path(row["source"]).name, row["page"]) for row in pages]


def _assert_every_document_once(output: Path, expected: list[Path]) -> None:
    documents, pages = _read_output(output)
    assert sorted(Path(row["source"]).name for row in documents) == sorted(path.name for path in expected)
    assert all(row["status"] == "ok" for row in documents), documents
    assert len({row["doc_id"] for row in documents}) == len(documents)
    assert sorted(pages) == _expected_pages(expected), "every page exactly once"


@pytest.fixture(scope="module")
def failing_jobs(ray_head, job_inputs, tiny_model, tmp_path_factory) -> Path:
    """Jobs that fail, submitted without waiting (as users of a cluster submit theirs) before the job that reads, which
    runs beside them; each test below reads how its own ended."""
    cpu_only = [override for override in CPU_OVERRIDES if not override.startswith(("recognize.num_gpus",
                                                                                    "recognize.accelerator_type"))]
    output = tmp_path_factory.mktemp("failing-jobs")
    entrypoints = {
        "ocr-no-gpu": ["run", str(job_inputs), "--output", str(output / "no-gpu"), "--config",
                       "configs/cluster-v100.yaml", "--set", f"recognize.model={tiny_model}",
                       "--set", "recognize.start_timeout_s=3", *[arg for item in cpu_only for arg in ("--set", item)]],
        "ocr-relative": ["run", str(job_inputs), "--output", "ocr-out"],
        "ocr-bad-model": ["run", str(job_inputs), "--output", str(output / "bad-model"),
                          "--set", f"recognize.model={output / 'no-such-model'}"],
    }
    for submission_id, arguments in entrypoints.items():
        submit = ray_head.job("submit", "--no-wait", "--submission-id", submission_id, "--working-dir", ".",
                              "--runtime-env", "docker/runtime-env.yaml", "--", "python", "-m", "pipeline.cli",
                              *arguments, timeout=120)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    return output


def test_job_submit_runs_the_cli_with_the_actors_that_fit_and_reports_in_the_job_logs(ray_head, failing_jobs,
                                                                                       job_inputs, job_documents,
                                                                                       tiny_model, tmp_path):
    """Two recognizer actors of 1.5 CPUs on a head of 2: one fits, and the job reads with it (Ray Data's wait for
    the pool's whole size had failed such a job after recognize.start_timeout_s)."""
    output = tmp_path / "ocr"
    overrides = [*CPU_OVERRIDES, "recognize.concurrency=2", "recognize.num_cpus=1.5", "rasterize.num_cpus=0.5",
                 "detect.num_cpus=0.5", "recognize.start_timeout_s=120"]
    entrypoint = ["python", "-m", "pipeline.cli", "run", str(job_inputs), "--output", str(output),
                  "--config", "configs/cluster-v100.yaml", "--set", f"recognize.model={tiny_model}",
                  *[arg for override in overrides for arg in ("--set", override)]]
    submit = ray_head.job("submit", "--submission-id", "ocr-ok", "--working-dir", ".",
                          "--runtime-env", "docker/runtime-env.yaml", "--", *entrypoint, timeout=300)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "Job 'ocr-ok' succeeded" in ray_head.status("ocr-ok")
    logs = ray_head.job("logs", "ocr-ok").stdout
    pages = len(_expected_pages(job_documents))
    assert "documents: 2 ok, 0 failed, 0 duplicates, 0 already done" in logs and f"pages: {pages} (0 failed)" in logs, logs[-3000:]
    _assert_every_document_once(output, job_documents)


def test_a_recognizer_no_node_fits_fails_the_job_instead_of_waiting_for_ever(ray_head, failing_jobs):
    """The V100 config on a cluster without V100s had stayed RUNNING, silent, with Ray's autoscaler repeating that
    no node type fits: on a cluster the GPU check is left to Ray, as an autoscaler may add the nodes."""
    assert f"failed with exit code {int(ExitCode.bad_args)}" in ray_head.ended("ocr-no-gpu")
    assert ("no node of the cluster took a recognizer actor within recognize.start_timeout_s=3 s" in
            ray_head.job("logs", "ocr-no-gpu").stdout)


@pytest.mark.parametrize("address, said", [("127.0.0.1:{port}", "cannot reach the Ray cluster at 127.0.0.1:"),
                                           ("[::1]:{port}", "cannot reach the Ray cluster at [::1]:"),
                                           ("http://127.0.0.1:{port}", "is a dashboard's")])
def test_a_ray_address_nothing_answers_at_is_said_in_one_line(job_inputs, tmp_path, address, said):
    """An address nothing answers at had hung the job in ray.init, silent, for good; a dashboard's URL (what the
    `ray job` commands take) had ended it with a traceback."""
    env = {**os.environ, "RAY_ADDRESS": address.format(port=_free_port())}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "detect", str(job_inputs), "--output",
                             str(tmp_path / "ocr")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_address_check_takes_the_address_ray_joins(monkeypatch):
    """A dashboard URL left in RAY_ADDRESS (for the `ray job` commands) had been refused though ray.address named
    the cluster, which Ray joins; and a head answering at [::1] had been refused as an unknown host."""
    from pipeline.config import load_config
    from pipeline.job import check_cluster_address, cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert cluster_address(load_config(None, ["ray.address=10.0.0.5:6379"])) == "10.0.0.5:6379"
    assert cluster_address(load_config(None, ["ray.address=auto"])) == "http://127.0.0.1:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(load_config(None, ["ray.address=auto"])) is None
    # no port, and a Ray client address nothing answers at: one line each (Ray's tracebacks had been printed)
    with pytest.raises(ConfigError, match="'bogus' is not a head's host:port"):
        check_cluster_address("bogus")
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at ray://127.0.0.1:{port}"):
        check_cluster_address(f"ray://127.0.0.1:{port}")
    try:
        head = socket.create_server(("::1", 0), family=socket.AF_INET6)  # something answering there
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    with head:
        check_cluster_address(f"[::1]:{head.getsockname()[1]}")


def test_a_relative_output_in_a_job_with_a_working_dir_is_refused(ray_head, failing_jobs):
    """`--output ocr-out` had landed in Ray's copy of the working dir, which Ray deletes, with the job SUCCEEDED."""
    assert "Job 'ocr-relative' failed" in ray_head.ended("ocr-relative")
    assert "'ocr-out' is relative" in ray_head.job("logs", "ocr-relative").stdout


@pytest.mark.parametrize("arguments", [["run", "scans/", "--output", "{abs}/out"],
                                       ["detect", "{abs}/scans", "scans/*.png", "--output", "{abs}/out"],
                                       ["inspect", "{abs}/scans", "--output", "overlays"],
                                       ["synth", "lines", "--output", "lines"],
                                       ["train", "--config", "{abs}/scans/train.yaml"]])
def test_a_relative_path_in_any_command_of_a_job_with_a_working_dir_is_refused(arguments, tmp_path, monkeypatch,
                                                                               capsys):
    """Only run's and detect's outputs had been checked: relative inputs were read from Ray's upload of them and
    recorded under its path, and inspect's, synth's and train's outputs written into Ray's copy, which Ray deletes
    (hours of training with them)."""
    from pipeline.cli import RAY_JOB_CONFIG_ENV, main

    (tmp_path / "scans").mkdir()
    text_page(["A scan"], size=(300, 120)).save(tmp_path / "scans" / "a.png")
    (tmp_path / "scans" / "train.yaml").write_text(yaml.safe_dump({
        "base_model": "printed", "output_dir": "models/mine", "work_dir": "out/train-mine", "steps": 10,
        "train_data": [{"kind": "folder", "path": str(tmp_path / "scans")}]}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    assert main([argument.format(abs=tmp_path) for argument in arguments]) == ExitCode.bad_args
    assert "is relative: in a job submitted with --working-dir" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scans"], "nothing written"


def test_job_submit_fails_the_job_with_the_cli_exit_code(ray_head, failing_jobs):
    status = ray_head.ended("ocr-bad-model")
    assert "Job 'ocr-bad-model' failed" in status
    assert f"Job entrypoint command failed with exit code {int(ExitCode.model_error)}" in status
    assert str(failing_jobs / "no-such-model") in ray_head.job("logs", "ocr-bad-model").stdout


def run_on_simulated_gpu_cluster(spec: dict) -> dict:
    """Subprocess side: a CPU-only head plus nodes declaring one (fake) GPU each, the job with one GPU
    per recognizer actor, then where the GPU-requesting actors lived (Ray's state API)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_workers

    from pipeline.config import load_config
    from pipeline.job import run_job

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})
    try:
        gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:V100": 1}).node_id
                     for _ in range(spec["gpu_nodes"])]
        ray.init(address=cluster.address, logging_level="WARNING")
        # An actor that the finished job stops while it is still starting is listed afterwards with
        # no node, so where each one lives is also read while the job runs.
        nodes: dict[str, str] = {}
        job_done = threading.Event()

        def note_actor_nodes() -> None:
            for actor in list_actors(detail=True, limit=1000):
                if actor.required_resources.get("GPU") and actor.node_id:
                    nodes.setdefault(actor.actor_id, actor.node_id)

        def watch() -> None:
            while not job_done.wait(0.5):
                note_actor_nodes()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            summary = run_job(spec["inputs"], spec["output"], load_config(None, spec["overrides"]))
        finally:
            job_done.set()
            watcher.join()
        note_actor_nodes()
        actors = [actor for actor in list_actors(detail=True, limit=1000) if actor.required_resources.get("GPU")]
        worker_nodes = {worker.pid: worker.node_id for worker in list_workers(detail=True, limit=10000)}
        for actor in actors:  # one stopped before the watcher saw it: the node of the process it ran in
            pid = ((actor.death_cause or {}).get("actor_died_error_context") or {}).get("pid")
            if actor.actor_id not in nodes and pid in worker_nodes:
                nodes[actor.actor_id] = worker_nodes[pid]
        return {"head_node": cluster.head_node.node_id, "gpu_nodes": gpu_nodes,
                "actor_nodes": [nodes.get(actor.actor_id) for actor in actors],
                "documents_ok": summary.written.documents_ok}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _on_a_simulated_gpu_cluster(spec: dict, tmp_path: Path) -> dict:
    """What this file, run as a program in a process of its own (a Ray cluster of its own), reports of ``spec``."""
    report = tmp_path / "report.json"
    ray_tmpdir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    try:
        result = subprocess.run([sys.executable, __file__, json.dumps(spec), str(report)], cwd=REPO,
                                env=_private_ray_env(ray_tmpdir), capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(report.read_text())


def test_recognizer_actors_spread_over_gpu_nodes(job_inputs, job_documents, tiny_model, tmp_path):
    gpu_nodes = 2
    spec = {"gpu_nodes": gpu_nodes, "inputs": [str(job_inputs)], "output": str(tmp_path / "ocr"),
            "overrides": ["rasterize.dpi=150", f"recognize.model={tiny_model}", "recognize.device=cpu",
                          "recognize.num_gpus=1", "recognize.num_cpus=0.5", f"recognize.concurrency={gpu_nodes}",
                          "recognize.max_new_tokens=4", "recognize.line_batch_size=16"]}
    placement = _on_a_simulated_gpu_cluster(spec, tmp_path)
    assert len(placement["actor_nodes"]) == gpu_nodes, placement
    assert sorted(placement["actor_nodes"]) == sorted(placement["gpu_nodes"]), "one actor per GPU node, none on the head"
    assert placement["documents_ok"] == 2
    _assert_every_document_once(tmp_path / "ocr", job_documents)


def lose_the_gpu_nodes_mid_job(spec: dict) -> dict:
    """Subprocess side: a CPU-only head plus one node declaring a (fake) GPU, which is taken away once the job's first
    page is read, as a spot instance is; and what the job said."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from pipeline.job import run_job
    from pipeline.progress import JobProgress

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
        os.environ["RAY_ADDRESS"] = cluster.address  # as `ray job submit` gives it: a cluster, not a local run
        ray.init(address=cluster.address, logging_level="WARNING")

        class LosingTheGpuNode(JobProgress):
            def page_done(self, work) -> None:
                super().page_done(work)
                if self.pages_done == 1:
                    cluster.remove_node(gpu_node)

        try:
            run_job(spec["inputs"], spec["output"], load_config(None, spec["overrides"]),
                    progress=LosingTheGpuNode(stream=io.StringIO()))
        except RecognizersLost as error:
            return {"lost": str(error)}
        return {"lost": None}
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_job_whose_gpu_nodes_are_all_lost_stops_and_keeps_what_it_finished(tiny_model, tmp_path):
    """Ray Data waits for ever for a node that can run the recognizer actors it lost: a cluster whose GPU nodes went
    (spot instances taken back) and were not replaced had hung the job with no word, holding the head."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for number in range(12):
        write_pdf(inputs / f"register-{number:02d}.pdf",
                  [text_page([f"Register {number}, page {page}", "Entered the second line of the page"],
                             size=(620, 877), font_px=14) for page in range(1, 5)], dpi=75)
    spec = {"run": "lose_the_gpu_nodes_mid_job", "inputs": [str(inputs)], "output": str(tmp_path / "ocr"),
            "overrides": ["rasterize.dpi=75", "rasterize.detect_orientation=false", f"recognize.model={tiny_model}",
                          "recognize.device=cpu", "recognize.num_gpus=1", "recognize.num_cpus=0.5",
                          "recognize.concurrency=1", "recognize.pages_per_batch=1", "recognize.lost_timeout_s=4",
                          "recognize.start_timeout_s=120",  # as long as the GPU node's first worker may take to start
                          "output.publish_every_s=1"]}
    assert _on_a_simulated_gpu_cluster(spec, tmp_path)["lost"] == (
        "the cluster has had no node that can run a recognizer actor (num_gpus=1, num_cpus=0.5, accelerator_type=None) "
        "for recognize.lost_timeout_s=4 s, and none was added (`ray status` and the autoscaler's log say why): the "
        "documents finished are published; run the job again once such nodes are back to read the rest")
    if (tmp_path / "ocr" / "documents").is_dir():  # what it finished (maybe nothing) is published whole
        documents, pages = _read_output(tmp_path / "ocr")
        assert len(documents) < 12, "the GPU node must go mid-job for this test to mean anything"
        assert sorted(pages) == sorted((Path(row["source"]).name, page) for row in documents for page in range(1, 5))


def test_the_watch_for_lost_gpu_nodes_interrupts_the_job_only_until_its_pages_are_read(ray_local, monkeypatch):
    """Once the pages are read, the GPU nodes may go (an autoscaler takes idle ones back) while the last exports are
    written: the watch had still stopped the finished job as RecognizersLost, its documents left to read again."""
    from pipeline.config import load_config
    from pipeline.job import RecognizerNodesWatch

    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)  # a cluster's job
    config = load_config(None, ["recognize.num_gpus=1", "recognize.lost_timeout_s=0.5"])  # this one has no GPU
    with pytest.raises(KeyboardInterrupt), RecognizerNodesWatch(config, "recognize") as watch:
        time.sleep(30)
    assert isinstance(watch.lost, RecognizersLost)
    with RecognizerNodesWatch(config, "recognize") as watch:
        watch.stop()  # the pages are read
        time.sleep(2)
    assert watch.lost is None
    with RecognizerNodesWatch(config, "detect") as watch:  # no recognizer to lose
        time.sleep(2)
    assert watch.lost is None


if __name__ == "__main__":  # the subprocess of the tests on a simulated GPU cluster
    sys.path.insert(0, str(REPO))
    arguments = json.loads(sys.argv[1])
    runs = {"lose_the_gpu_nodes_mid_job": lose_the_gpu_nodes_mid_job}
    Path(sys.argv[2]).write_text(json.dumps(runs.get(arguments.get("run"), run_on_simulated_gpu_cluster)(arguments)))
