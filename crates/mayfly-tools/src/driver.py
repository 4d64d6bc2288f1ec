# mayfly python worker driver: one long-lived interpreter, one JSON request per line on
# stdin, one marked JSON response line on stdout. User output is captured, never mixed
# with the protocol (stray writes to fd 1 are tolerated: the host skips unmarked lines).
import ast, io, json, linecache, sys, textwrap, traceback

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


def _run(code, inp):
    g = {"__name__": "__mayfly_step__", "__builtins__": __builtins__}
    if isinstance(inp, dict):
        g.update(inp)
    g["input_data"] = inp
    obj, wrapped, lines = _compile(code)
    # Lets tracebacks show the offending source line of the step.
    linecache.cache["<step>"] = lines
    exec(obj, g)
    if wrapped:
        return g["__mayfly_main__"](inp)
    if "result" in g:
        return g["result"]
    main = g.get("main")
    if callable(main):
        try:
            return main(**inp) if isinstance(inp, dict) else main(inp)
        except TypeError:
            return main(inp)
    return None


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
            sys.stdout, sys.stderr = so, se
            try:
                value = _run(req.get("code", ""), req.get("input") or {})
            finally:
                sys.stdout, sys.stderr = real
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
