#!/usr/bin/env python3
"""Write the benchmark playbooks under bench/workloads/.

The generated files are checked in; run this again only to change them.

  workloads/{chain1,chain40,fanout1000}.yaml        mayfly, trivial `python` steps
  workloads/shell/{chain1,chain40,fanout1000}.yaml  mayfly, trivial `shell` steps (`true`)
  workloads/noetl/{chain1,chain40,fanout1000}.yaml  NoETL local runtime, trivial `shell` steps

NoETL's local runtime (the `noetl` PyPI package, `noetl run --runtime local`) runs neither
`python` tools nor `loop:` (a loop step runs its tool once, with the iterator unrendered), so
its fan-out is the dialect's other fan-out construct: one step whose `next` router is
`mode: inclusive` with 1,000 arcs to 1,000 trivial steps. It also treats a step named `end`
as a terminal marker that is never executed, so no workload has one.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "workloads"

PY_TOOL = """    tool:
      kind: python
      code: "result = 1"
"""
SH_TOOL = """    tool:
      kind: shell
      cmds: ["true"]
"""
FANOUT = 1000
MAX_IN_FLIGHT = 64  # what `mayfly bench` uses for its fan-out


def header(name: str, what: str, path: str) -> str:
    return (
        f"# {what}\n"
        "apiVersion: noetl.io/v2\n"
        "kind: Playbook\n"
        "metadata:\n"
        f"  name: {name}\n"
        f"  path: {path}\n"
        "workflow:\n"
    )


def chain(n: int, tool: str, prefix: str, kind: str) -> str:
    name = f"chain{n}"
    s = header(name, f"{n} sequential trivial {kind} step(s).", f"{prefix}/{name}")
    for i in range(n):
        step = "start" if i == 0 else f"s{i}"
        s += f"  - step: {step}\n{tool}"
        if i + 1 < n:
            s += f"    next:\n      arcs:\n        - step: s{i + 1}\n"
    return s


def loop_fanout(tool: str, prefix: str, kind: str) -> str:
    name = f"fanout{FANOUT}"
    s = header(
        name,
        f"One trivial {kind} step, then a parallel loop of {FANOUT} trivial {kind} items.",
        f"{prefix}/{name}",
    )
    s += f"  - step: start\n{tool}    next:\n      arcs:\n        - step: fan\n"
    s += (
        "  - step: fan\n"
        "    loop:\n"
        f'      in: "{{{{ range({FANOUT}) }}}}"\n'
        "      iterator: i\n"
        "      spec:\n"
        "        mode: parallel\n"
        f"        max_in_flight: {MAX_IN_FLIGHT}\n"
        f"{tool}"
    )
    return s


def arcs_fanout(tool: str, prefix: str, kind: str) -> str:
    name = f"fanout{FANOUT}"
    s = header(
        name,
        f"One trivial {kind} step fanning out (inclusive router) to {FANOUT} trivial "
        f"{kind} steps.\n# (NoETL's local runtime has no loop; see gen_workloads.py.)",
        f"{prefix}/{name}",
    )
    s += f"  - step: start\n{tool}    next:\n      spec:\n        mode: inclusive\n      arcs:\n"
    s += "".join(f"        - step: item{i}\n" for i in range(FANOUT))
    s += "".join(f"  - step: item{i}\n{tool}" for i in range(FANOUT))
    return s


def write(rel: str, text: str) -> None:
    p = OUT / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def main() -> None:
    for n in (1, 40):
        write(f"chain{n}.yaml", chain(n, PY_TOOL, "bench", "python"))
        write(f"shell/chain{n}.yaml", chain(n, SH_TOOL, "bench/shell", "shell"))
        write(f"noetl/chain{n}.yaml", chain(n, SH_TOOL, "bench/noetl", "shell"))
    write(f"fanout{FANOUT}.yaml", loop_fanout(PY_TOOL, "bench", "python"))
    write(f"shell/fanout{FANOUT}.yaml", loop_fanout(SH_TOOL, "bench/shell", "shell"))
    write(f"noetl/fanout{FANOUT}.yaml", arcs_fanout(SH_TOOL, "bench/noetl", "shell"))


if __name__ == "__main__":
    main()
