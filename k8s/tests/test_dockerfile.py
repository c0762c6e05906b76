"""The Dockerfile, checked without a container engine (none on this machine): hadolint
finds nothing; every base image is named in full (registry/repository:tag); its stages
chain, every COPY --from names an earlier stage, the binary it copies is the one the
build produces, the runtime is distroless and non-root with only the binary, the
cargo-chef recipe layer comes before the sources, and .dockerignore keeps out nothing
the Cargo build needs. The image the release workflow publishes is the one k8s/base
deploys."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib

import yaml
from conftest import REPO, kustomize, tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    assert not current, "dangling line continuation"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(name, base image, instructions) per stage."""
    result = []
    for op, args in instructions():
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, args
            result.append((m.group(2) or "", m.group(1), []))
        elif result:
            result[-1][2].append((op, args))
    return result


def test_stages_chain_and_copy_from_earlier_stages():
    seen = []
    for name, _base, body in stages():
        for op, args in body:
            if op == "COPY" and "--from=" in args:
                source = re.search(r"--from=(\S+)", args).group(1)
                assert source in seen, f"COPY --from={source} before that stage"
        seen.append(name)
    names = [s[0] for s in stages()]
    assert names == ["chef", "planner", "builder", "runtime"]
    assert stages()[1][1] == "chef" and stages()[2][1] == "chef"


def test_dependencies_are_cooked_before_the_sources_arrive():
    _, _, builder = stages()[2]
    ops = [(op, args) for op, args in builder]
    cook = next(i for i, (op, a) in enumerate(ops) if op == "RUN" and "chef cook" in a)
    copy_all = next(i for i, (op, a) in enumerate(ops) if op == "COPY" and a.startswith(". "))
    recipe = next(i for i, (op, a) in enumerate(ops) if op == "COPY" and "recipe.json" in a)
    assert recipe < cook < copy_all
    # The cook and the build agree on profile, target and package (or the cache misses).
    build = next(a for op, a in ops if op == "RUN" and "cargo build" in a)
    for flag in ("--release", "--locked", "--package tidewatch-server"):
        assert flag in ops[cook][1] and flag in build, flag
    # No target triple: buildx builds each platform of the multi-arch image natively.
    assert "--target" not in ops[cook][1] and "--target" not in build


def test_runtime_is_distroless_nonroot_with_only_the_binary():
    name, base, body = stages()[-1]
    assert base.startswith("gcr.io/distroless/cc-debian12")
    assert base.endswith(":nonroot")
    copies = [a for op, a in body if op in ("COPY", "ADD")]
    assert copies == ["--from=builder /tidewatch /usr/local/bin/tidewatch"]
    assert ("USER", "65532:65532") in body
    assert ("ENTRYPOINT", '["/usr/local/bin/tidewatch"]') in body
    # The builder puts the binary of the workspace's `tidewatch` target there.
    _, _, builder = stages()[2]
    build = next(a for op, a in builder if op == "RUN" and "cargo build" in a)
    assert "--bin tidewatch" in build
    assert "target/release/tidewatch /tidewatch" in build
    server = tomllib.loads((REPO / "server" / "Cargo.toml").read_text())
    assert server["package"]["name"] == "tidewatch-server"
    bins = {b["name"] for b in server.get("bin", [])} or {server["package"]["name"]}
    assert "tidewatch" in bins


def test_rust_version_matches_the_pinned_toolchain():
    toolchain = tomllib.loads((REPO / "rust-toolchain.toml").read_text())["toolchain"]
    arg = next(a for op, a in instructions() if op == "ARG" and a.startswith("RUST_VERSION="))
    assert arg == f"RUST_VERSION={toolchain['channel']}"


def test_dockerignore_keeps_what_cargo_needs():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        # Docker's rule: a pattern that matches a directory excludes what is under it;
        # `**/` matches any number of leading directories.
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pattern in patterns:
            for prefix in prefixes:
                if fnmatch.fnmatch(prefix, pattern):
                    return True
                if pattern.startswith("**/"):
                    tail = prefix.split("/")
                    if any(fnmatch.fnmatch("/".join(tail[j:]), pattern[3:])
                           for j in range(len(tail))):
                        return True
        return False

    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())
    needed = ["Cargo.toml", "Cargo.lock", "build.rs", "proto/tidewatch/v1/telemetry.proto",
              "proto/lib.rs", "server/Cargo.toml", "server/src/main.rs"]
    needed += [f"{m}/Cargo.toml" for m in workspace["workspace"]["members"] if m != "."]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not ignored(path), f".dockerignore drops {path}"
    for path in ("target/release/tidewatch", ".git/HEAD", ".venv/bin/python",
                 "data/nab-dev/windows.json", "clients/typescript/node_modules/x"):
        assert ignored(path), f".dockerignore keeps {path}"


def test_hadolint_finds_nothing():
    result = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_fully_qualified():
    # podman and buildah refuse short names (`rust:...`) unless a registry alias exists:
    # a base image names its registry host (with a dot), repository and tag.
    args = {a.split("=", 1)[0]: a.split("=", 1)[1]
            for op, a in instructions() if op == "ARG" and "=" in a}
    names = [s[0] for s in stages()]
    for _name, base, _body in stages():
        if base in names:
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        host, _, rest = image.partition("/")
        assert "." in host, f"{base}: no registry host"
        assert re.fullmatch(r"[a-z0-9./_-]+:[\w.-]+", rest), f"{base}: no tag"


def test_k8s_base_deploys_the_image_the_release_publishes():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    image = workflow["env"]["IMAGE"]
    version = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    deploy = next(o for o in kustomize(REPO / "k8s" / "base")
                  if o["kind"] == "Deployment" and o["metadata"]["name"] == "tidewatch")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"{image}:{version}"
