"""`maccap serve`: the page in a real headless Chromium (Debian's chromium and chromium-driver), the HTTP API under
8 concurrent requests, and every kind of bad upload, against a server started by the command on 127.0.0.1 with a
tiny model. Captions, candidates, scores and answers are compared with the model's own `generate` / `answer`."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from modeling_maccap import MacCapForConditionalGeneration
from modeling_maccap.tools import serve_app
from modeling_maccap.tools.cli import build_parser, main
from modeling_maccap.tools.serve import DEMO_MODEL
from modeling_maccap.tools.tiny import TINY_MACCAP

from .conftest import random_image

gradio_client = pytest.importorskip("gradio_client")

DEFAULTS = {"num_candidates": 4, "num_beams": 4, "max_new_tokens": 16, "noise_seed": 0}  # the page's defaults


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(components, tmp_path_factory):
    from modeling_maccap import MacCapProcessor

    clip_dir, lm_dir = components
    folder = tmp_path_factory.mktemp("serve") / "maccap-tiny"
    MacCapForConditionalGeneration.from_pretrained_components(clip=clip_dir, lm=lm_dir, **TINY_MACCAP).save_pretrained(
        folder)
    MacCapProcessor.from_pretrained_components(clip=clip_dir, lm=lm_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(folder):
    """The served folder loaded here, independently of the server: what its captions must equal."""
    return MacCapForConditionalGeneration.from_pretrained(folder).eval()


def serve_env():
    return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}


def start(command, port, log_path, cwd, env, timeout=180):
    """Start a server command that listens on 127.0.0.1:`port`, wait until it answers; (process, url)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}): {Path(log_path).read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError(f"no answer on {url} in {timeout} s: {Path(log_path).read_text()[-3000:]}")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """`maccap serve FOLDER` in a process of its own; (url, log file)."""
    log, port = tmp_path_factory.mktemp("serve-log") / "server.log", free_port()
    process, url = start([sys.executable, "-m", "modeling_maccap.tools.cli", "serve", str(folder), "--host",
                          "127.0.0.1", "--port", str(port)], port, log, folder.parent, serve_env())
    yield url, log
    stop(process)


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server[0], verbose=False, download_files=False)


def expected(model, images, **settings):
    """(kept captions, [[(candidate, score), ...] best first]) from `generate` on these images, called here."""
    settings = {**DEFAULTS, **settings}
    inputs = model.processor(images=images)
    out = model.generate(**inputs, output_candidates=True, **settings)
    kept = model.processor.batch_decode(out.sequences)
    candidates = [sorted(zip(model.processor.batch_decode(c), s.tolist()), key=lambda pair: -pair[1])
                  for c, s in zip(out.candidates, out.candidate_scores)]
    return kept, candidates


def caption(client, paths, **settings):
    settings = {**DEFAULTS, **settings}
    files = [gradio_client.handle_file(str(p)) for p in paths]
    return client.predict(files, settings["num_candidates"], settings["num_beams"], settings["max_new_tokens"],
                          settings["noise_seed"], api_name="/caption")


def save_images(tmp_path, seeds, size=(48, 40)):
    paths = []
    for seed in seeds:
        paths.append(tmp_path / f"image-{seed}.png")
        random_image(seed, size).save(paths[-1])
    return paths


def batch_sizes(log, start=0):
    """The request count of every caption batch the server ran, from its log (after character `start`)."""
    return [int(n) for n in re.findall(r"caption batch: (\d+) requests", log.read_text()[start:])]


def batch_started(log, start=0):
    """Whether the server has started a caption batch since character `start` of its log."""
    return "caption batch started" in log.read_text()[start:]


# ------------------------------------------------------------------------------------------------- the API
def test_candidates_scores_and_controls_equal_generate(model, client, tmp_path):
    paths = save_images(tmp_path, (40, 41))
    settings = {"num_candidates": 3, "num_beams": 2, "max_new_tokens": 5, "noise_seed": 7}
    gallery, text, table, status = caption(client, paths, **settings)
    kept, candidates = expected(model, [Image.open(p) for p in paths], **settings)
    assert status == ""
    assert text.splitlines() == [f"{p.name}: {c}" for p, c in zip(paths, kept)]
    assert [item["caption"] for item in gallery] == [f"{p.name}: {c}" for p, c in zip(paths, kept)]
    rows = table["data"]
    assert [(r[0], r[1], r[3]) for r in rows] == [(p.name, c, "kept" if rank == 0 else "")
                                                  for p, cands in zip(paths, candidates)
                                                  for rank, (c, _) in enumerate(cands)]
    assert [r[2] for r in rows] == pytest.approx([s for cands in candidates for _, s in cands], abs=1e-4)
    assert [r[1] for r in rows if r[3] == "kept"] == kept
    # another seed draws other noise: the control reaches generate (its captions are generate's for seed 8)
    _, other, _, _ = caption(client, paths, **{**settings, "noise_seed": 8})
    assert other.splitlines() == [f"{p.name}: {c}" for p, c in zip(paths, expected(
        model, [Image.open(p) for p in paths], **{**settings, "noise_seed": 8})[0])]


def test_vqa_answer_equals_model_answer(model, client, tmp_path):
    (path,) = save_images(tmp_path, (50,))
    answer, status = client.predict(gradio_client.handle_file(str(path)), "what is on the table?", 3,
                                    api_name="/answer")
    want = model.answer(model.processor(images=[Image.open(path)])["pixel_values"], ["what is on the table?"],
                        noise_seed=3)
    assert (answer, status) == (want[0], "")
    assert client.predict(gradio_client.handle_file(str(path)), " ", 0, api_name="/answer") == (
        "", "Ask a question about the image.")


def truncated_png(path):
    random_image(60, (64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def huge_png(path):
    Image.new("1", (10000, 10000)).save(path)  # 100 megapixels, a small file


@pytest.mark.parametrize("name, make, message", [
    ("notes.txt", lambda p: p.write_text("not an image"), "notes.txt: not an image (or a format PIL cannot read)"),
    ("half.png", truncated_png, "half.png: the image is truncated or corrupt ("),  # then PIL's words
    ("empty.png", lambda p: p.write_bytes(b""), "empty.png: the file is empty (0 bytes)"),
    ("huge.png", huge_png, "huge.png: 10000x10000 is 100 megapixels, over this demo's limit of 40 megapixels; "
                           "downscale it"),
])
def test_a_bad_upload_is_named_and_the_server_keeps_serving(model, client, tmp_path, name, make, message):
    make(tmp_path / name)
    gallery, text, table, status = caption(client, [tmp_path / name])
    assert status == f"Not captioned: {message}" or (message.endswith("(") and status.startswith(
        f"Not captioned: {message}") and status.count("(") == 1)
    assert (gallery, text, table["data"]) == ([], "", [])
    # beside a good image in the same request: the good one is captioned, the bad one named
    (good,) = save_images(tmp_path, (61,))
    _, text, _, status = caption(client, [good, tmp_path / name])
    assert text == f"{good.name}: {expected(model, [Image.open(good)])[0][0]}"
    assert status.startswith(f"Not captioned: {message}")


def test_eight_concurrent_requests_are_batched_and_equal_one_by_one(model, server, client, tmp_path):
    """8 requests at once (6 with the page's settings, 2 with other ones), sent while the server is busy with a
    slow request: all answered with the captions `generate` gives each image alone, in fewer batches than
    requests (the queue runs one batch at a time, so the 8 wait together for the slow one)."""
    url, log = server
    start_at = len(log.read_text())
    busy = client.submit([gradio_client.handle_file(str(p)) for p in save_images(tmp_path, range(100, 116))],
                         16, 8, 64, 0, api_name="/caption")  # the most images and the slowest settings
    deadline = time.monotonic() + 120
    while not batch_started(log, start_at):
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.01)
    paths = save_images(tmp_path, range(70, 78))
    settings = [{} for _ in range(6)] + [{"num_candidates": 2, "max_new_tokens": 6}] * 2
    jobs = [client.submit([gradio_client.handle_file(str(p))], *{**DEFAULTS, **s}.values(), api_name="/caption")
            for p, s in zip(paths, settings)]
    got = [job.result(timeout=300)[1] for job in jobs]
    busy.result(timeout=300)
    want = [f"{p.name}: {expected(model, [Image.open(p)], **s)[0][0]}" for p, s in zip(paths, settings)]
    assert got == want
    sizes = batch_sizes(log, start_at)
    print(f"batch sizes the server ran: {sizes} (the first is the slow request)")
    (tmp_path / "batch_sizes.txt").write_text(f"{sizes}\n")
    assert sizes[0] == 1 and sum(sizes[1:]) == 8 and len(sizes) - 1 < 8


# --------------------------------------------------------------------------------------------- the browser
def chromium():
    """A headless Debian Chromium driven through its chromium-driver (nothing downloads a browser)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        reason = "no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; tests/run_matrix.sh installs them in CI")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                     # the page must need nothing from outside 127.0.0.1, and the browser reaches nothing else
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def upload_and_caption(browser, url, path, wait_for):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))[0].send_keys(str(path))
    # uploaded: the file component links the file on the server
    wait.until(lambda b: [a for a in b.find_elements(By.CSS_SELECTOR, "#upload a")
                          if (a.get_attribute("href") or "").endswith("/" + path.name)])
    browser.find_element(By.ID, "caption-button").click()
    return wait.until(lambda b: wait_for(b) or None)


def test_browser_shows_generates_caption_and_names_a_corrupt_file(model, server, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = server
    paths = save_images(tmp_path, range(80, 88), size=(96, 72))
    kept = expected(model, [Image.open(p) for p in paths])[0]
    path, caption = next((p, c) for p, c in zip(paths, kept) if c)  # a random tiny model can write an empty one
    want = f"{path.name}: {caption}"
    truncated_png(tmp_path / "broken.png")
    browser = chromium()
    try:
        shown = upload_and_caption(browser, url, path, lambda b: b.find_element(
            By.CSS_SELECTOR, "#captions textarea").get_attribute("value"))
        assert shown == want
        browser.save_screenshot(str(tmp_path / "serve.png"))
        status = upload_and_caption(browser, url, tmp_path / "broken.png", lambda b: b.find_element(
            By.ID, "caption-status").text)
        assert status.startswith("Not captioned: broken.png: the image is truncated or corrupt")
        browser.save_screenshot(str(tmp_path / "serve-error.png"))
    finally:
        browser.quit()
    assert Image.open(tmp_path / "serve.png").size[0] > 0


# ------------------------------------------------------------------------------------------ without MODEL
def test_without_model_it_serves_the_demo_model_or_says_how(tmp_path, monkeypatch, capsys):
    from modeling_maccap.tools.serve import resolve_model

    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"no MODEL given and no demo model in {DEMO_MODEL}: run `maccap demo`" in err
    (tmp_path / DEMO_MODEL).mkdir(parents=True)
    (tmp_path / DEMO_MODEL / "config.json").write_text("{}")
    assert resolve_model(None) == str(DEMO_MODEL)
    assert resolve_model("org/name") == "org/name"
    # where `maccap demo` writes with its default --output-dir
    assert build_parser().parse_args(["demo"]).output_dir == DEMO_MODEL.parts[0]


def test_read_upload_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    """A file over MAX_PIXELS is refused from its header: decoding it would fail the test."""
    huge_png(tmp_path / "huge.png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    with pytest.raises(serve_app.UploadError, match="over this demo's limit of 40 megapixels"):
        serve_app.read_upload(tmp_path / "huge.png")
