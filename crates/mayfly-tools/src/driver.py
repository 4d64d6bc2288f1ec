# mayfly python worker driver: one long-lived interpreter, one JSON request per line on
# stdin, one marked JSON response line on stdout. User output is captured, never mixed
# with the protocol (stray writes to fd 1 are tolerated: the host skips unmarked lines).
import ast, io, json, linecache, os, sys, textwrap, traceback

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


def _clip(s):
    return s if len(s) <= LIMIT else s[:LIMIT] + "\n[truncated]"


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
            env = req.get("env") or {}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update({k: str(v) for k, v in env.items()})
            sys.stdout, sys.stderr = so, se
            try:
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
