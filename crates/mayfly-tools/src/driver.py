# mayfly python worker driver: one long-lived interpreter, one JSON request per line on
# stdin, one marked JSON response line on stdout. User output is captured, never mixed
# with the protocol (stray writes to fd 1 are tolerated: the host skips unmarked lines).
import ast, io, json, linecache, os, shutil, sys, textwrap, traceback

MARK = "\x1e@@MAYFLY@@"
LIMIT = 65536


def _has_top_level_return(tree):
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return False


# Compiled steps by source: a fan-out runs one step's code thousands of times, and parsing
# and compiling it each time cost more than running it.
_COMPILED = {}
_COMPILED_MAX = 256


def _compile(code):
    hit = _COMPILED.get(code)
    if hit is not None:
        return hit
    try:
        tree = ast.parse(code, "<step>", "exec")
        wrapped = False
    except SyntaxError as e:
        if "outside function" not in str(e):
            raise
        tree = None
        wrapped = True
    if tree is not None and _has_top_level_return(tree):
        wrapped = True
    if wrapped:
        src = "def __mayfly_main__(input_data):\n" + textwrap.indent(code, "    ") + "\n    return locals().get('result')\n"
        obj = compile(src, "<step>", "exec")
    else:
        src = code
        obj = compile(tree, "<step>", "exec")
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    hit = _COMPILED[code] = (obj, wrapped, (len(src), None, src.splitlines(True), "<step>"))
    return hit


def _run(code, inp, req):
    # NoETL's wrapper prologue, in its order: json and sys pre-imported; `context`, `args`,
    # `variables`, `execution_id`, `step`; every input key a global; `input_data` (a copy
    # of the whole input) last, so an input key named `input_data` is overwritten by it.
    ctx = req.get("context") or {}
    context = {
        "args": inp,
        "variables": ctx.get("variables") or {},
        "execution_id": ctx.get("execution_id"),
        "step": ctx.get("step"),
    }
    g = {
        "__name__": "__mayfly_step__",
        "__builtins__": __builtins__,
        "json": json,
        "sys": sys,
        "context": context,
        "args": inp,
        "variables": context["variables"],
        "execution_id": context["execution_id"],
        "step": context["step"],
    }
    if isinstance(inp, dict):
        g.update(inp)
        g["input_data"] = dict(inp)
    else:
        g["input_data"] = inp
    libs = req.get("libs")
    if libs:
        exec(compile(libs, "<libs>", "exec"), g)
    obj, wrapped, lines = _compile(code)
    # Lets tracebacks show the offending source line of the step.
    linecache.cache["<step>"] = lines
    exec(obj, g)
    if wrapped:
        return g["__mayfly_main__"](inp)
    result = g.get("result")
    main = g.get("main")
    if result is None and callable(main):
        result = _call_main(main, inp)
    return result


def _call_main(main, inp):
    # NoETL's `main()` convention: parameters bound from the input by name, a `**kwargs`
    # parameter takes all of it, an `async def main` is awaited. A single parameter that no
    # input key names receives the whole input (mayfly's `def main(input_data)`).
    import inspect
    args = inp if isinstance(inp, dict) else {}
    try:
        params = list(inspect.signature(main).parameters.values())
    except (TypeError, ValueError):
        params = []
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        rv = main(**args)
    elif len(named) == 1 and named[0].name not in args and len(params) == 1:
        rv = main(inp)
    else:
        rv = main(**{p.name: args[p.name] for p in named if p.name in args})
    if inspect.iscoroutine(rv):
        import asyncio
        rv = asyncio.run(rv)
    return rv


def _traceback(e):
    # Only the user's frames: the driver's own frames are noise.
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == "<step>"]
    text = "Traceback (most recent call last):\n" if frames else ""
    return text + "".join(traceback.format_list(frames)) + "".join(traceback.format_exception_only(type(e), e))


def _fresh_dirs():
    # A sandboxed step starts in an empty /work and /tmp: nothing of the step before it.
    for d in ("/work", "/tmp"):
        try:
            entries = os.listdir(d)
        except OSError:
            continue
        for e in entries:
            p = os.path.join(d, e)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
            except OSError:
                pass
    os.chdir("/work")


def _cpu_budget(seconds):
    # This step's CPU time from now (SIGXCPU ends the interpreter past it); the sandbox's
    # wall-clock timeout bounds the step whatever the step does to this limit.
    if not seconds:
        return
    import resource
    u = resource.getrusage(resource.RUSAGE_SELF)
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    want = int(u.ru_utime + u.ru_stime) + 1 + int(seconds)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (want, hard))


def _shell(req):
    # A shell task in this (sandboxed) interpreter's sandbox: each command in its own
    # session, its CPU bounded, whatever it left running killed after it; the step's
    # deadline over all commands. Per command: returncode (negative: killed by that
    # signal), stdout, stderr, duration_ms; `timed_out` names the command cut off.
    import signal, subprocess, time
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (req.get("env") or {}).items()})
    cwd = req.get("cwd") or "/work"
    if not cwd.startswith("/"):
        cwd = os.path.join("/work", cwd)
    os.makedirs(cwd, exist_ok=True)
    deadline = time.monotonic() + float(req.get("timeout_s") or 300)
    cpu = req.get("cpu_s")
    done = []
    for c in req.get("cmds") or []:
        began = time.monotonic()
        if began >= deadline:
            return {"commands": done, "timed_out": c}
        p = subprocess.Popen([req.get("shell") or "sh", "-c", c], env=env, cwd=cwd,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
        if cpu:
            try:
                import resource
                resource.prlimit(p.pid, resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
            except OSError:
                pass
        try:
            so, se = p.communicate(timeout=max(0.001, deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        if timed_out:
            p.communicate()
            return {"commands": done, "timed_out": c}
        done.append({
            "cmd": c,
            "returncode": p.returncode,
            "stdout": _clip(so.decode("utf-8", "replace"), 1 << 20),
            "stderr": _clip(se.decode("utf-8", "replace"), 1 << 20),
            "duration_ms": int((time.monotonic() - began) * 1000),
        })
        if p.returncode != 0:
            break
    return {"commands": done}


def _clip(s, limit=LIMIT):
    return s if len(s) <= limit else s[:limit] + "\n[truncated]"


def serve():
    # The protocol goes to the real stdout's bytes; the step's own writes to sys.stdout and
    # sys.stderr go to per-request buffers (swapped in directly: a fan-out calls this
    # thousands of times, and the context managers cost more than the step).
    out = sys.stdout.buffer
    dumps = json.dumps
    for line in sys.stdin:
        if not line.strip():
            continue
        so, se = io.StringIO(), io.StringIO()
        real = sys.stdout, sys.stderr
        try:
            req = json.loads(line)
            box = req.get("sandbox")
            if box:
                _fresh_dirs()
                _cpu_budget(box.get("cpu_s"))
            env = req.get("env") or {}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update({k: str(v) for k, v in env.items()})
            sys.stdout, sys.stderr = so, se
            try:
                if "shell" in req:
                    value = _shell(req["shell"])
                else:
                    value = _run(req.get("code", ""), req.get("input") or {}, req)
            finally:
                sys.stdout, sys.stderr = real
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            # Encoded once, straight into the response (no decode and re-encode).
            head = '{"ok": true, "result": ' + dumps(value, default=str)
        except BaseException as e:  # noqa: B036 - report everything, including SystemExit
            sys.stdout, sys.stderr = real
            tb = _traceback(e)
            err = {"type": type(e).__name__, "message": str(e), "traceback": _clip(tb)}
            head = '{"ok": false, "error": ' + dumps(err)
        resp = head + ', "stdout": ' + dumps(_clip(so.getvalue())) + ', "stderr": ' + dumps(_clip(se.getvalue())) + "}"
        out.write((MARK + resp + "\n").encode())
        out.flush()


serve()
