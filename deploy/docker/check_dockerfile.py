#!/usr/bin/env python3
"""Keeps deploy/docker/Dockerfile in step with the Makefile, scripts/install-deps.sh and
the Helm chart, from the parse of parse_dockerfile.js (no Docker engine needed).

usage: check_dockerfile.py PARSED.json REPO_ROOT
"""
import json
import re
import sys


def main():
    parsed = json.load(open(sys.argv[1]))
    root = sys.argv[2]
    errors = []
    for d in parsed["diagnostics"]:
        if d["severity"] == 1:
            errors.append(f"line {d['line']}: {d['message']} (dockerfile-utils)")

    stages = {}
    current = None
    for ins in parsed["instructions"]:
        if ins["keyword"] == "FROM":
            args = ins["args"]
            name = args[2] if len(args) == 3 and args[1].lower() == "as" else f"#{len(stages)}"
            current = name
            stages[name] = {"from": args[0], "ins": []}
        elif current is not None:
            stages[current]["ins"].append(ins)
    missing = [want for want in ("build", "runtime") if want not in stages]
    if missing:
        return report(errors + [f"no stage named '{want}'" for want in missing])
    build, runtime = stages["build"], stages["runtime"]
    if not re.match(r"^nvidia/cuda:\$\{CUDA_VERSION\}-devel-", build["from"]):
        errors.append(f"build stage is not on nvidia/cuda:*-devel-*: {build['from']}")
    if not re.match(r"^nvidia/cuda:\$\{CUDA_VERSION\}-runtime-", runtime["from"]):
        errors.append(f"runtime stage is not on nvidia/cuda:*-runtime-*: {runtime['from']}")

    # Build stage: dependencies only through scripts/install-deps.sh, then `make build`.
    runs = [i["content"] for i in build["ins"] if i["keyword"] == "RUN"]
    copies = [i for i in build["ins"] if i["keyword"] == "COPY"]
    deps_run = next((k for k, r in enumerate(runs) if "scripts/install-deps.sh" in r), None)
    make_run = next((k for k, r in enumerate(runs) if re.search(r"(^|&&\s*)make build\b", r)), None)
    if deps_run is None:
        errors.append("the build stage does not run scripts/install-deps.sh")
    if make_run is None:
        errors.append("the build stage does not run `make build` (the Makefile's configure + build)")
    if deps_run is not None and make_run is not None and deps_run > make_run:
        errors.append("install-deps.sh runs after make build")
    for r in runs:
        if re.search(r"\bapt(-get)?\s+install\b", r):
            errors.append(f"the build stage installs packages outside scripts/install-deps.sh: {r[:80]}")
        if re.search(r"\b(cmake|ninja)\b", r) and "make build" not in r:
            errors.append(f"the build stage calls cmake/ninja itself instead of the Makefile: {r[:80]}")
    if not any(c["args"][:1] == ["scripts/install-deps.sh"] for c in copies):
        errors.append("install-deps.sh is not copied on its own before the sources (layer cache)")
    make_line = runs[make_run] if make_run is not None else ""
    m = re.search(r"BUILD_DIR=(\S+)", make_line)
    build_dir = m.group(1) if m else "build"

    # The Makefile still has the targets and variables the Dockerfile passes.
    makefile = open(f"{root}/Makefile").read()
    for target in ("build", "configure", "deps"):
        if not re.search(rf"^{target}:", makefile, re.M):
            errors.append(f"the Makefile has no '{target}' target")
    for var in re.findall(r"(?:^|\s)([A-Z_]+)=", make_line):
        if not re.search(rf"^{var}\s*\?=", makefile, re.M):
            errors.append(f"make build is given {var}=, which the Makefile does not define")
    if "scripts/install-deps.sh" not in makefile:
        errors.append("the Makefile no longer installs through scripts/install-deps.sh")

    # The binary the stage copies is where CMake puts it.
    out_run = next((r for r in runs if "/out/" in r), "")
    if f"{build_dir}/cli/kvgate" not in out_run:
        errors.append(f"the runtime tree does not take {build_dir}/cli/kvgate")
    if not re.search(r"^add_executable\(kvgate\b", open(f"{root}/cli/CMakeLists.txt").read(), re.M):
        errors.append("cli/CMakeLists.txt no longer builds the kvgate executable")

    # Runtime stage: the chart's assumptions.
    rins = {}
    for i in runtime["ins"]:
        rins.setdefault(i["keyword"], []).append(i)
    if not any(any(f["name"] == "from" and f["value"] == "build" for f in c["flags"]) for c in rins.get("COPY", [])):
        errors.append("the runtime stage copies nothing from the build stage")
    for r in rins.get("RUN", []):
        errors.append(f"the runtime stage runs commands (keep it a copy): {r['content'][:60]}")
    values = open(f"{root}/deploy/helm/kvgate/values.yaml").read()
    uid = re.search(r"runAsUser:\s*(\d+)", values).group(1)
    user = rins.get("USER", [{"args": [""]}])[-1]["args"][0]
    if user.split(":")[0] != uid:
        errors.append(f"runtime USER {user!r} is not the chart's runAsUser {uid}")
    model = re.search(r"^\s+path:\s*(\S+)", values, re.M).group(1)
    if model.startswith("/opt/kvgate/") and f"/out{model}" not in out_run:
        errors.append(f"the chart's default model path {model} is not in the image")
    exposed = set(" ".join(" ".join(e["args"]) for e in rins.get("EXPOSE", [])).split())
    for key, pat in (("service.port", r"^service:\n(?:  .*\n)*?  port:\s*(\d+)"),
                     ("internal.port", r"^internal:\n(?:  .*\n)*?  port:\s*(\d+)"),
                     ("metrics.port", r"^metrics:\n(?:  .*\n)*?  port:\s*(\d+)")):
        port = re.search(pat, values, re.M).group(1)
        if port not in exposed:
            errors.append(f"the chart's {key} {port} is not EXPOSEd")
    entry = rins.get("ENTRYPOINT", [{"content": ""}])[-1]["content"]
    if "/opt/kvgate/bin/kvgate" not in entry:
        errors.append("the ENTRYPOINT is not /opt/kvgate/bin/kvgate (the chart passes the subcommand as args)")
    return report(errors)


def report(errors):
    if errors:
        for e in errors:
            print(f"FAIL {e}")
        print(f"0 passed, {len(errors)} failed")
        return 1
    print("PASS Dockerfile parses, lints clean and stays in step with the Makefile, install-deps.sh and the chart")
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
