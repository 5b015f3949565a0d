"""The web playground at /, driven in headless Chromium (Selenium) against a real live server on the tiny models.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the PyPI ``selenium`` package
(the ``test`` extra); without them the tests skip and say which one is missing.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil

import pytest
from conftest import float32_default
from service_support import LiveServer

SR = 44100
WAIT = 90  # seconds; generous, the CI machine has two cores and may be busy

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def _find(name: str, debian_path: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    return debian_path if os.access(debian_path, os.X_OK) else None


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")


@pytest.fixture(autouse=True)
def _float32():
    """The live server generates while this module's tests run; other modules may leave a float64 default."""
    with float32_default():
        yield


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian package chromium is not installed (no chromium on PATH or at /usr/bin/chromium)")
    if CHROMEDRIVER is None:
        pytest.skip("Debian package chromium-driver is not installed (no chromedriver on PATH or at "
                    "/usr/bin/chromedriver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for (or downloading) a driver.
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def console(driver) -> str:
    """The page's console messages, for assertion messages."""
    try:
        return "\n".join(f"{e['level']}: {e['message']}" for e in driver.get_log("browser")) or "(console empty)"
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(console log unavailable: {exc})"


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error")
        raise AssertionError(f"timed out waiting for {what}; #error={error.text!r}; status="
                             f"{driver.find_element(By.ID, 'status').text!r}\n{console(driver)}") from None


def set_value(driver, element_id: str, text: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(text)


def wait_for_audio(driver, previous_src: str = "") -> str:
    """Waits for a new blob: source on the <audio> element; fails at once when the page shows an error instead."""
    def result(d):
        error = d.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error instead of audio: {error.text!r}\n{console(d)}")
        src = d.find_element(By.ID, "player").get_attribute("src") or ""
        return src if src.startswith("blob:") and src != previous_src else False

    return wait_for(driver, result, "an <audio> element with a new blob: source")


def models_loaded(driver) -> bool:
    return driver.find_element(By.ID, "model").is_enabled() and driver.find_element(By.ID, "generate").is_enabled()


# Runs inside the page: fetch the <audio> element's blob: source, read the WAV header by hand, decode it with
# WebAudio, and return both views plus the raw bytes.
CHECK_AUDIO_JS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const src = document.getElementById("player").src;
  const bytes = await (await fetch(src)).arrayBuffer();
  const v = new DataView(bytes);
  const tag = (o) => String.fromCharCode(...new Uint8Array(bytes, o, 4));
  const header = { riff: tag(0), wave: tag(8) };
  for (let o = 12; o + 8 <= bytes.byteLength; ) {
    const id = tag(o), size = v.getUint32(o + 4, true);
    if (id === "fmt ") {
      Object.assign(header, { format: v.getUint16(o + 8, true), channels: v.getUint16(o + 10, true),
        sampleRate: v.getUint32(o + 12, true), bits: v.getUint16(o + 22, true) });
    } else if (id === "data") {
      header.dataBytes = size;
    }
    o += 8 + size + (size & 1);
  }
  // Decoding at 44.1 kHz gives the file's own frame count only if the file is 44.1 kHz (otherwise it resamples).
  const audio = await new OfflineAudioContext(2, 1, 44100).decodeAudioData(bytes.slice(0));
  let peak = 0;
  for (let c = 0; c < audio.numberOfChannels; c++) {
    for (const x of audio.getChannelData(c)) peak = Math.max(peak, Math.abs(x));
  }
  let binary = "";
  for (const b of new Uint8Array(bytes)) binary += String.fromCharCode(b);
  done({ src, header, decoded: { channels: audio.numberOfChannels, length: audio.length,
         sampleRate: audio.sampleRate, peak }, base64: btoa(binary) });
})().catch((e) => done({ error: String(e) }));
"""

# Runs inside the page: how much the spectrogram canvas varies (a blank or one-colour canvas has 1 colour).
CANVAS_STATS_JS = r"""
const c = document.getElementById("spectrogram");
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const colours = new Set();
let sum = 0, sum2 = 0, n = 0;
for (let i = 0; i < d.length; i += 4) {
  colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  const y = 0.2126 * d[i] + 0.7152 * d[i + 1] + 0.0722 * d[i + 2];
  sum += y; sum2 += y * y; n++;
}
const mean = sum / n;
return { colours: colours.size, mean, std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)),
         opaque: d[3] === 255 };
"""


def test_page_and_static_files_are_served(server):
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="gen-form"' in page.text and "/static/playground.js" in page.text
        for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.headers)
            # Everything the page loads comes from this server: it must work offline (no CDN).
            assert "://" not in r.text, name
        assert "://" not in page.text
        assert c.get("/docs").status_code == 200


def test_spectrogram_maths(server, browser):
    """The spectrogram's radix-2 FFT, run in the browser, against numpy; and its STFT on a known sine."""
    import numpy as np

    browser.get(server.url + "/")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256) + 1j * rng.standard_normal(256)
    got = browser.execute_script(
        "const re = Float64Array.from(arguments[0]), im = Float64Array.from(arguments[1]);"
        "window.playground.makeFFT(re.length)(re, im); return [Array.from(re), Array.from(im)];",
        x.real.tolist(), x.imag.tolist())
    np.testing.assert_allclose(np.array(got[0]) + 1j * np.array(got[1]), np.fft.fft(x), atol=1e-9)

    # A full-scale sine at exactly bin 128 of a 1024-point frame: every column peaks there, at about 0 dBFS.
    peaks = browser.execute_script("""
      const n = 8192, sine = new Float32Array(n);
      for (let i = 0; i < n; i++) sine[i] = Math.sin(2 * Math.PI * 128 * i / 1024);
      const { db, bins, columns } = window.playground.stftDb(sine, 1024, 8);
      return Array.from({length: columns}, (_, c) => {
        const col = Array.from(db.subarray(c * bins, (c + 1) * bins));
        const top = Math.max(...col);
        return [col.indexOf(top), top];
      });""")
    assert len(peaks) == 8
    for k, top in peaks:
        assert k == 128 and abs(top) < 0.1, peaks


def test_generate_in_the_browser(server, browser):
    browser.get(server.url + "/")
    wait_for(browser, models_loaded, "the model list from GET /models")

    # The model select lists every model with its kind and default steps; changing it resets the defaults.
    model = Select(browser.find_element(By.ID, "model"))
    options = {o.get_attribute("value"): o.text for o in model.options}
    assert set(options) == {"tiny", "tiny-arc"}
    assert "teacher" in options["tiny"] and "4 steps" in options["tiny"] and "arc" in options["tiny-arc"]
    assert model.first_selected_option.get_attribute("value") == "tiny"  # the server's default model
    guidance = browser.find_element(By.ID, "guidance")
    assert guidance.get_attribute("placeholder") == "default 3"
    model.select_by_value("tiny-arc")
    assert guidance.get_attribute("placeholder") == "default 1"
    assert "pingpong" in browser.find_element(By.ID, "model-help").text
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"
    model.select_by_value("tiny")

    prompt = "A dog barks twice!"
    seed = 2**63 - 1  # beyond 2^53: only exact if the page sends the digits verbatim
    set_value(browser, "prompt", prompt)
    set_value(browser, "duration", "1")
    set_value(browser, "steps", "3")
    set_value(browser, "seed", str(seed))

    # Record what the page shows while it works: a disabled button and the progress display.
    browser.execute_script("""
      window.seen = {disabled: false, progress: false};
      const button = document.getElementById("generate"), box = document.getElementById("progress-box");
      new MutationObserver(() => {
        seen.disabled ||= button.disabled;
        seen.progress ||= !box.hidden;
      }).observe(document.body, {attributes: true, subtree: true});
    """)
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser)
    assert browser.execute_script("return window.seen") == {"disabled": True, "progress": True}
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "error").is_displayed()

    audio = browser.execute_async_script(CHECK_AUDIO_JS)
    assert "error" not in audio, f"{audio['error']}\n{console(browser)}"
    header, decoded = audio["header"], audio["decoded"]
    assert (header["riff"], header["wave"], header["format"], header["bits"]) == ("RIFF", "WAVE", 1, 16)
    assert (header["sampleRate"], header["channels"]) == (SR, 2)
    assert header["dataBytes"] == SR * 2 * 2  # 1 s of 16-bit stereo
    assert (decoded["channels"], decoded["length"], decoded["sampleRate"]) == (2, SR, SR)
    assert decoded["peak"] > 0

    # The browser got exactly what the API returns for the same request (the seed arrived intact).
    with server.client() as c:
        direct = c.post("/generate", json={"prompt": prompt, "model": "tiny", "duration": 1, "steps": 3,
                                           "seed": seed, "format": "wav"})
    assert direct.status_code == 200
    wav = base64.b64decode(audio["base64"])
    assert hashlib.sha256(wav).hexdigest() == hashlib.sha256(direct.content).hexdigest()

    # Seed, download link, timings.
    assert browser.find_element(By.ID, "seed-out").text == str(seed)
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("href") == audio["src"]
    assert link.get_attribute("download") == f"a-dog-barks-twice-seed{seed}.wav"
    rows = [r.find_elements(By.TAG_NAME, "td") for r in browser.find_elements(By.CSS_SELECTOR, "#timing tbody tr")]
    stages = {cells[0].text: float(cells[1].text) for cells in rows}
    assert list(stages)[:4] == ["queue", "encode", "denoise", "decode"]
    assert stages["denoise"] > 0 and stages["decode"] > 0

    # The spectrogram is drawn after decoding: wait until the canvas shows an image with structure.
    stats = wait_for(browser, lambda d: (s := d.execute_script(CANVAS_STATS_JS))["colours"] > 20 and s,
                     "a spectrogram on the canvas")
    assert stats["opaque"] and stats["std"] > 5, stats
    assert "44100 Hz" in browser.find_element(By.ID, "spectrogram").get_attribute("aria-label")

    # A second run is timed against the first: the progress bar becomes determinate (has a value).
    browser.execute_script("""
      window.progressValues = [];
      const bar = document.getElementById("progress");
      new MutationObserver(() => bar.hasAttribute("value") && progressValues.push(bar.value))
        .observe(bar, {attributes: true});
    """)
    browser.find_element(By.ID, "reuse-seed").click()
    set_value(browser, "duration", "2")
    first_src = audio["src"]
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser, first_src)
    second = browser.execute_async_script(CHECK_AUDIO_JS)
    assert "error" not in second, second["error"]
    assert second["decoded"]["length"] == 2 * SR and second["header"]["dataBytes"] == 2 * SR * 4
    values = browser.execute_script("return window.progressValues")
    assert values and all(0 <= v <= 1 for v in values), values


def test_api_key_and_errors(base_settings, browser):
    """With API keys configured the page asks for one, shows the 401 clearly, and sends the key it is given."""
    with float32_default():
        srv = LiveServer(base_settings.model_copy(update={"api_keys": "playground-key"}))
    try:
        browser.execute_script("sessionStorage.clear()")
        browser.get(srv.url + "/")
        error = browser.find_element(By.ID, "error")
        wait_for(browser, lambda d: error.is_displayed(), "the 401 from GET /models")
        assert "401" in error.text and "unauthorized" in error.text and "API key" in error.text
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed() and not browser.find_element(By.ID, "generate").is_enabled()

        key.send_keys("wrong-key")
        browser.find_element(By.ID, "prompt").click()  # leaving the field commits the key
        wait_for(browser, lambda d: "the key entered was refused" in error.text, "the wrong key refused")
        assert "401" in error.text
        assert not browser.find_element(By.ID, "generate").is_enabled()

        key.clear()
        key.send_keys("playground-key")
        browser.find_element(By.ID, "prompt").click()
        wait_for(browser, models_loaded, "the model list once the right key is given")
        assert not error.is_displayed()

        set_value(browser, "prompt", "rain on a tin roof")
        browser.find_element(By.ID, "generate").click()
        wait_for_audio(browser)
        audio = browser.execute_async_script(CHECK_AUDIO_JS)
        assert (audio["header"]["sampleRate"], audio["header"]["channels"]) == (SR, 2)
        assert audio["decoded"]["length"] == SR  # the tiny model's default duration, 1 s
    finally:
        srv.stop()
