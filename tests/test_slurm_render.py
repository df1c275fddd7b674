"""jobs.submit without a cluster: dry runs, rendered sbatch scripts, the submission folder, Ray commands.

The scripts are run for real in tests/test_slurm.py; these tests pin what they contain (directives, NCCL
and OMP settings, the requeue path) and check they are valid bash, for every shape of job.
"""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest

from jobs.registry import JOBS
from jobs.submit import main
from pipeline.cluster.config import REQUEUE_EXIT_CODE, LaunchConfig
from pipeline.cluster.render import render
from pipeline.cluster.snapshot import JobConfigError
from pipeline.cluster.submit import SubmitRequest, make_plan, write
from pipeline.config import load_config

REPO = Path(__file__).resolve().parents[1]


def plan_for(
    tmp_path: Path,
    job: str,
    *launch: str,
    target: str = "slurm",
    config: str | None = None,
    overrides: tuple[str, ...] = (),
):
    cfg = load_config(LaunchConfig, None, [f"--run_dir={tmp_path / 'run'}", *launch], base=LaunchConfig())
    return make_plan(SubmitRequest(target, job, config, overrides, cfg, workdir=str(tmp_path)), JOBS)


def script_of(plan) -> str:
    return plan.files[f"{plan.request.job}.sbatch"]


def sbatch_options(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def assert_valid_bash(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert last_directive < first_command, "sbatch ignores #SBATCH lines after the first command"


def shard_config(tmp_path: Path) -> str:
    path = tmp_path / "shard.toml"
    path.write_text("[source]\nparquet = ['meta/*.parquet']\n[output]\npath = 'shards'\n")
    return str(path)


def test_requeue_exit_code_is_the_trainers_preemption_exit_code():
    from pipeline.dist import PreemptionFlag

    assert REQUEUE_EXIT_CODE == PreemptionFlag.EXIT_CODE


def test_multi_node_gpu_pretraining_script_runs_one_task_per_gpu_and_requeues_on_preemption(tmp_path):
    plan = plan_for(
        tmp_path,
        "smoke",
        "--slurm.nodes=4",
        "--slurm.gpus_per_node=8",
        "--slurm.cpus_per_task=12",
        "--slurm.partition=gpu",
        "--slurm.time=2-00:00:00",
        "--slurm.signal_seconds=300",
        "--env.nccl.NCCL_SOCKET_IFNAME=ib0",
        "--slurm.setup=['module load cuda/12.4']",
    )
    script = script_of(plan)
    assert_valid_bash(script, tmp_path)
    opts = sbatch_options(script)
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gres=gpu:8",
        "--cpus-per-task=12",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        f"--output={plan.run_dir}/logs/%x-%j.out",
    ):
        assert expected in opts, (expected, opts)
    assert "export NCCL_SOCKET_IFNAME=ib0" in script and "export OMP_NUM_THREADS=12" in script
    assert "export NCCL_DEBUG=WARN" in script
    assert "module load cuda/12.4" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and "--nodes=4" in srun
    assert "--kill-on-bad-exit=0 --wait=120" in srun  # ranks exiting 124 one after another are not killed
    assert "trap 'forward USR1' USR1" in script and "trap 'forward TERM' TERM" in script
    assert f'if [ "$rc" -eq {REQUEUE_EXIT_CODE} ]' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert f"--config {plan.record_dir}/job.toml" in script
    assert f"export PYTHONPATH={plan.record_dir}" in script


def test_pretraining_defaults_give_each_gpu_its_loader_workers_and_the_whole_nodes_memory(tmp_path):
    vit = str(REPO / "jobs" / "configs" / "pretrain" / "vit_b16.toml")  # data.num_workers = 8
    script = script_of(
        plan_for(tmp_path, "pretrain", "--slurm.nodes=2", "--slurm.gpus_per_node=8", config=vit)
    )
    assert_valid_bash(script, tmp_path)
    opts = sbatch_options(script)
    assert "--cpus-per-task=9" in opts and "--mem=0" in opts and "--ntasks-per-node=8" in opts
    assert "export OMP_NUM_THREADS=9" in script
    srun = script[script.index("\nsrun ") :].split(" &\n")[0]  # the training step (continued lines)
    assert "--cpus-per-task=9" in srun
    fewer = script_of(plan_for(tmp_path, "pretrain", config=vit, overrides=("--data.num_workers=3",)))
    assert "--cpus-per-task=4" in sbatch_options(fewer)
    # explicit values win; mem="" passes no --mem at all (the cluster's default)
    explicit = sbatch_options(
        script_of(plan_for(tmp_path, "pretrain", "--slurm.cpus_per_task=12", "--slurm.mem=480G", config=vit))
    )
    assert "--cpus-per-task=12" in explicit and "--mem=480G" in explicit and "--mem=0" not in explicit
    none = sbatch_options(script_of(plan_for(tmp_path, "pretrain", "--slurm.mem=", config=vit)))
    assert not any(o.startswith("--mem") for o in none)


def test_array_tasks_share_nodes_by_default_and_ray_clusters_take_whole_nodes(tmp_path):
    shard = sbatch_options(script_of(plan_for(tmp_path, "shard", config=shard_config(tmp_path))))
    assert "--cpus-per-task=1" in shard and not any(o.startswith("--mem") for o in shard)
    ray = sbatch_options(script_of(plan_for(tmp_path, "sweep", "--module=jobs.smoke")))
    assert "--mem=0" in ray


@pytest.mark.parametrize("value", ["lots", "64 G", "-1"])
def test_a_bad_slurm_mem_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="slurm.mem"):
        load_config(LaunchConfig, None, [f"--slurm.mem={value}"], base=LaunchConfig())


def test_cpu_pretraining_without_gpus_asks_for_no_gres_and_uses_tasks_per_node(tmp_path):
    opts = sbatch_options(script_of(plan_for(tmp_path, "smoke", "--slurm.tasks_per_node=2")))
    assert "--ntasks-per-node=2" in opts and not any(o.startswith("--gres") for o in opts)


def test_shard_job_is_an_array_with_one_log_per_task_and_no_gpus(tmp_path):
    shard = plan_for(
        tmp_path, "shard", "--slurm.array_tasks=64", "--slurm.array_parallel=8", config=shard_config(tmp_path)
    )
    script = script_of(shard)
    assert_valid_bash(script, tmp_path)
    opts = sbatch_options(script)
    assert "--array=0-63%8" in opts and "--ntasks=1" in opts
    assert not any(o.startswith("--gres") for o in opts) and "--requeue" not in opts
    assert f"--output={shard.run_dir}/logs/%x-%A_%a.out" in opts
    assert "-m data_prep.shard --config" in script


def test_caption_array_requests_a_gpu_per_task_unless_told_otherwise(tmp_path):
    assert JOBS["caption"].slurm_kind == "array"
    config = tmp_path / "caption.toml"
    config.write_text("[input]\nshards = 'shards'\n[output]\npath = 'syn'\n")
    opts = sbatch_options(script_of(plan_for(tmp_path, "caption", config=str(config))))
    assert "--gres=gpu:1" in opts and "--array=0-1" in opts
    cpu = sbatch_options(
        script_of(plan_for(tmp_path, "caption", "--slurm.gpus_per_array_task=0", config=str(config)))
    )
    assert not any(o.startswith("--gres") for o in cpu)


def test_ray_cluster_script_starts_head_and_workers_then_submits_the_driver(tmp_path):
    plan = plan_for(
        tmp_path,
        "sweep",
        "--module=jobs.smoke",
        "--slurm.nodes=3",
        "--slurm.gpus_per_node=4",
        "--slurm.cpus_per_task=32",
        "--ray.entrypoint_num_cpus=1",
    )
    script = script_of(plan)
    assert_valid_bash(script, tmp_path)
    opts = sbatch_options(script)
    assert "--nodes=3" in opts and "--ntasks-per-node=1" in opts and "--gres=gpu:4" in opts
    assert "start --head --block" in script and "--num-gpus=4" in script and "--num-cpus=32" in script
    submit = next(line for line in script.splitlines() if line.startswith('"$RAY" job submit'))
    words = shlex.split(submit)
    assert (
        words[:4] == ["$RAY", "job", "submit", "--address=$DASHBOARD"]
        and "--entrypoint-num-cpus=1.0" in words
    )
    # SLURM nodes share the filesystem: the driver runs the snapshot in place, from the submit directory
    assert words[words.index("--") :] == [
        "--",
        "bash",
        "-c",
        f"cd {tmp_path} && exec python -m jobs.smoke --config {plan.record_dir / 'job.toml'}",
    ]
    upload = script_of(plan_for(tmp_path, "sweep", "--module=jobs.smoke", "--ray.upload=true"))
    assert "-- python -m jobs.smoke --config job.toml" in upload and "--working-dir=" in upload


def test_ray_cluster_on_slurm_uses_token_auth_and_keeps_its_dashboard_on_the_head_node(tmp_path):
    plan = plan_for(tmp_path, "sweep", "--module=jobs.smoke", "--slurm.nodes=2")
    script = script_of(plan)
    assert_valid_bash(script, tmp_path)
    head = next(line for line in script.splitlines() if "start --head" in line)
    head += script.split(head, 1)[1].split("&\n", 1)[0]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in script
    assert 'DASHBOARD="http://127.0.0.1:8265"' in script  # the batch script runs on the head
    assert "export RAY_AUTH_MODE=token" in script
    token_file = plan.record_dir / "ray_auth_token"
    assert f"export RAY_AUTH_TOKEN_PATH={token_file}" in script

    # the token block as the job runs it: a fresh random token in a file only the user can read, not in the
    # log, removed when the job ends
    block = script[script.index("export RAY_AUTH_MODE=") : script.index("\nfi\n") + 4]
    token_file.parent.mkdir(parents=True)
    seen = tmp_path / "seen"
    check = f'cp "$RAY_AUTH_TOKEN_PATH" {seen}; stat -c %a "$RAY_AUTH_TOKEN_PATH" >&2'
    run = ["bash", "-c", f'set -euo pipefail; log() {{ echo "$*"; }}; {block}\n{check}']
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7"}
    done = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    token = seen.read_text()
    assert len(token) == 64 and int(token, 16) and token not in done.stdout and token not in script
    assert done.stderr.strip() == "600" and not token_file.exists()
    subprocess.run(run, env=env, check=True)
    assert seen.read_text() != token  # each job start makes its own
    # a token the user brings is used as it is: nothing is written
    keep = f"log() {{ :; }}; {block}\ntest ! -e {token_file}"
    subprocess.run(["bash", "-c", keep], env={**env, "RAY_AUTH_TOKEN": "x"}, check=True)
    subprocess.run(["bash", "-c", keep], env={**env, "RAY_AUTH_TOKEN_PATH": "/run/user/token"}, check=True)

    off = script_of(
        plan_for(
            tmp_path,
            "sweep",
            "--module=jobs.smoke",
            "--ray.token_auth=false",
            "--ray.dashboard_host=0.0.0.0",
        )
    )
    assert "export RAY_AUTH_MODE=disabled" in off and "--dashboard-host=0.0.0.0" in off
    assert 'DASHBOARD="http://$HEAD_IP:8265"' in off


def test_dry_run_prints_script_and_config_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "--target",
                "slurm",
                "--job",
                "smoke",
                "--dry-run",
                "--steps=7",
                f"--launch.run_dir={run_dir}",
                "--launch.slurm.nodes=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "steps = 7" in out and "#SBATCH --nodes=2" in out and "sbatch --parsable" in out
    assert not run_dir.exists()


def test_submission_folder_holds_the_code_snapshot_and_resolved_configs(tmp_path):
    plan = plan_for(tmp_path, "smoke", "--slurm.nodes=2", overrides=("--steps=9",))
    write(plan)
    rec = plan.record_dir
    assert rec.parent == plan.run_dir / "submit" and (plan.run_dir / "logs").is_dir()
    assert (rec / "jobs" / "smoke.py").read_bytes() == (REPO / "jobs" / "smoke.py").read_bytes()
    assert (rec / "jobs" / "submit.py").exists() and (rec / "slurm" / "pretrain.sbatch").exists()
    assert (rec / "k8s" / "base" / "pretrain" / "pytorchjob.yaml").exists()
    assert (
        not list(rec.rglob("__pycache__")) and not (rec / ".venv").exists() and not (rec / "tests").exists()
    )
    job = tomllib.loads((rec / "job.toml").read_text())
    assert job["steps"] == 9 and job["run_dir"] == str(plan.run_dir)  # the job writes into the same run dir
    launch = load_config(LaunchConfig, rec / "launch.toml")
    assert launch == plan.request.launch
    assert (rec / "smoke.sbatch").stat().st_mode & 0o111
    again = plan_for(tmp_path, "smoke")
    assert again.record_dir != rec  # a later submission never overwrites this one


def test_the_job_rejects_a_bad_key_before_anything_is_submitted(tmp_path, capsys):
    with pytest.raises(JobConfigError, match="stepz"):
        plan_for(tmp_path, "smoke", overrides=("--stepz=3",))
    for bad, name in (
        ("--launch.slurm.nodez=2", "slurm.nodez"),
        ("--launch.slurm.nodes=0", "slurm.nodes"),
        ("--stepz=3", "stepz"),
    ):
        assert main(["--target", "slurm", "--job", "smoke", "--dry-run", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m jobs.submit: error: ") and name in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_ray_target_submits_the_snapshot_as_working_dir_and_refuses_pretraining(tmp_path):
    plan = plan_for(
        tmp_path,
        "sweep",
        "--module=jobs.smoke",
        "--ray.address=http://head:8265",
        "--ray.no_wait=true",
        "--env.extra.FOO=bar",
        target="ray",
    )
    cmd = plan.command
    assert cmd[1:3] == ["job", "submit"] and "--address=http://head:8265" in cmd and "--no-wait" in cmd
    assert f"--working-dir={plan.record_dir}" in cmd
    assert cmd[cmd.index("--") :] == ["--", "python", "-m", "jobs.smoke", "--config", "job.toml"]
    assert '"FOO": "bar"' in next(c for c in cmd if c.startswith("--runtime-env-json="))
    with pytest.raises(ValueError, match="target"):
        plan_for(tmp_path, "pretrain", target="ray")


def test_template_renderer_refuses_missing_values():
    assert render("a {{ x }} b", {"x": "1"}) == "a 1 b"
    with pytest.raises(KeyError, match="y"):
        render("{{ x }} {{ y }}", {"x": 1})
    assert shlex.split(render("{{ x }}", {"x": shlex.quote("a b")})) == ["a b"]


def test_ray_target_without_upload_runs_the_snapshot_in_place_from_the_working_directory(tmp_path):
    plan = plan_for(tmp_path, "sweep", "--module=jobs.smoke", "--ray.upload=false", target="ray")
    cmd = plan.command
    assert not any(c.startswith("--working-dir") for c in cmd)
    driver = cmd[cmd.index("--") + 1 :]
    assert driver[:2] == ["bash", "-c"]
    assert shlex.split(driver[2]) == [
        "cd",
        str(tmp_path),
        "&&",
        "exec",
        "python",
        "-m",
        "jobs.smoke",
        "--config",
        str(plan.record_dir / "job.toml"),
    ]
    env = next(c for c in cmd if c.startswith("--runtime-env-json="))
    assert f'"PYTHONPATH": "{plan.record_dir}"' in env and '"PYTHONSAFEPATH": "1"' in env
