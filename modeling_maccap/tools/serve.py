"""`maccap serve MODEL`: the web demo (serve_app.py, the same file a Space runs) on a local MacCap folder or Hub id.

Only the standard library is imported at module level: the CLI imports the commands to build its parser.
"""

from pathlib import Path

from .errors import MacCapError
from .jobs import load_inference_model

# Where `maccap demo` (default --output-dir maccap-demo) leaves its trained model: the paper's method.
DEMO_MODEL = Path("maccap-demo") / "work" / "maccap-noise"


def resolve_model(name):
    """MODEL as given, or the demo's trained model when none is given; a MacCapError says how to get one."""
    if name is not None:
        return name
    if (DEMO_MODEL / "config.json").is_file():
        return str(DEMO_MODEL)
    raise MacCapError(f"no MODEL given and no demo model in {DEMO_MODEL}: run `maccap demo` here first (about 9 "
                      "minutes on 2 CPU cores, offline), or pass a MacCap folder or Hub id: maccap serve ORG/NAME")


def add_parser(commands):
    serve = commands.add_parser("serve", help="the web demo (Gradio): caption and VQA tabs around a MacCap model")
    serve.add_argument("model", nargs="?", help=f"a MacCap folder or Hub id (default: the demo's model, {DEMO_MODEL})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 "
                                                           "for every interface)")
    serve.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    serve.set_defaults(run=run)
    return serve


def run(args):
    try:
        from . import serve_app
    except ImportError as error:
        raise MacCapError(f"maccap serve needs Gradio ({error}): pip install \"maccap[serve]\"") from None
    name = resolve_model(args.model)
    model = load_inference_model(name)
    serve_app.log_batches()
    serve_app.logger.info("serving %s on http://%s:%d", name, args.host, args.port)
    serve_app.launch(serve_app.build_demo(model, model.processor, title=f"MacCap: {Path(name).name}"),
                     host=args.host, port=args.port)
    return 0
