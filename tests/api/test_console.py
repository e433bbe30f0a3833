"""The web console (api/console/) in a real headless browser: Debian's chromium driven by Playwright, against the
real stack of tests/api/test_e2e.py (a Ray head and a uvicorn gateway as background processes), over HTTP only.

One stack for the module, two jobs submitted at once: a pipeline that trains the micro plan's three stages (two
growths), and a long one-stage job, held. While the pipeline runs the browser signs in with a wrong key and with
another owner's key (neither sees a job), starts the held job from its page and cancels it there, follows the
pipeline live to SUCCEEDED, reads its curves with the two growth markers and deploys it with the page's button,
streams a completion of that deployment in the playground and prices a preset on the plan page. What the pages
show is checked against the REST routes.

Screenshots of the pages go to the test's temporary directory; with FLM_CONSOLE_SCREENSHOTS=DIR (docs/ for the
README's) they are copied there too.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from api.stack import stop_processes
from tests.api.test_e2e import Stack, plan
from tests.conftest import ray_test_env

CHROMIUM = Path(os.environ.get("FLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no chromium binary at {CHROMIUM}: `apt-get install chromium` "
                                                      f"(make setup does, as root) or set FLM_CHROMIUM"),
]
LONG = 5000  # steps of the job that is cancelled: far more than the test lets it run
WAIT_MS = 300_000  # the browser's wait for Ray: training three stages and deploying take minutes on a loaded machine


@pytest.fixture(scope="module")
def stack(tmp_path_factory, micro_data):
    home = tmp_path_factory.mktemp("flm-home")
    shutil.copytree(micro_data, home / "owners" / "e2e" / "micro")
    with ray_test_env():
        s = Stack(home, dict(os.environ))
        s.http.headers["Authorization"] = f"Bearer {s.key}"
        yield s
        stop_processes({"gateway": {"pid": s.gw["pid"]}, "ray": {"pid": s.ray["pid"]}}, grace_s=10)


@pytest.fixture(scope="module")
def jobs(stack):
    """The grown pipeline (3 stages; no eval or deploy step: the console deploys it) and the long job (HELD: the
    console starts it), submitted before any page opens so that Ray works while the browser does."""
    body = {"kind": "pipeline", "plan": plan(3)}
    r = stack.http.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    grown = r.json()["id"]
    long = plan(1, log_every=5, eval_every=1000, checkpoint_every=1000)
    long["stages"][0]["tokens"] = LONG * 4 * 32
    r = stack.http.post("/v1/jobs", json={"kind": "train", "plan": long, "hold": True})
    assert r.status_code == 201, r.text
    return {"grown": grown, "long": r.json()["id"]}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """save(page, name): a full-page PNG in the test's directory (and in $FLM_CONSOLE_SCREENSHOTS if set)."""
    out = tmp_path_factory.mktemp("screenshots")
    extra = os.environ.get("FLM_CONSOLE_SCREENSHOTS")

    def save(page, name):
        path = out / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        if extra:
            shutil.copy(path, Path(extra) / path.name)
        return path

    return save


@pytest.fixture(scope="module")
def page(browser, stack):
    """The signed-in console of the `e2e` key's owner, shared by the tests in order; fails a test on any script
    error of the page."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.goto(f"{stack.gw['url']}/console/")
    sign_in(pg, stack.key)
    pg.wait_for_selector("#jobs-table")
    yield pg
    context.close()


def sign_in(page, key):
    page.get_by_role("textbox", name="API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def badge(page, selector="h1 .state"):
    return page.locator(selector).first.get_attribute("data-state")


def test_a_wrong_key_and_another_owners_key_see_none_of_the_jobs(browser, stack, jobs):
    from api.settings import GatewaySettings
    from api.store import create_key, open_store

    context = browser.new_context()
    pg = context.new_page()
    pg.goto(f"{stack.gw['url']}/console/#/jobs/{jobs['grown']}")
    sign_in(pg, "flm_not-a-key")
    pg.wait_for_selector("#login-error:has-text('not accepted')")
    assert pg.locator("#login").is_visible() and pg.locator("#page *").count() == 0
    assert pg.evaluate("sessionStorage.length") == 0  # a refused key is not kept

    other, _ = create_key(open_store(GatewaySettings(home=stack.home).db_url), "mallory")
    sign_in(pg, other)
    pg.wait_for_selector(".error:has-text('belongs to another owner')")  # the grown job's page: a 403, no data
    assert pg.locator("#chart-tokens, .facts").count() == 0
    pg.goto(f"{stack.gw['url']}/console/#/jobs")
    pg.wait_for_selector("#jobs-table + p:has-text('No jobs yet')")
    assert pg.locator("tr[data-job]").count() == 0
    assert all(k not in pg.url for k in (other, stack.key))  # the key is never in a URL
    context.close()


def test_start_a_held_job_and_cancel_it_from_its_page(page, stack, jobs):
    long = jobs["long"]
    page.goto(f"{stack.gw['url']}/console/#/jobs")
    for job_id in jobs.values():
        page.wait_for_selector(f"tr[data-job='{job_id}']")
    row = page.locator(f"tr[data-job='{long}']")
    assert row.locator("td").nth(1).inner_text() == "train" and row.get_attribute("data-state") == "HELD"
    row.get_by_role("link", name=long).click()
    page.wait_for_selector(f"h1:has-text('{long}') .state[data-state='HELD']")
    page.get_by_role("button", name="Start").click()  # POST .../resume
    page.wait_for_selector("#action-status:has-text('Resume: done')")
    page.get_by_role("link", name="← Jobs").click()
    page.wait_for_selector(f"tr[data-job='{long}'][data-state='RUNNING']", timeout=WAIT_MS)  # the table follows
    assert stack.get(f"/v1/jobs/{long}")["attempt"] == 1
    row.get_by_role("link", name=long).click()
    page.wait_for_selector(f"h1:has-text('{long}') .state[data-state='RUNNING']")
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("button", name="Yes, cancel it").click()
    page.wait_for_selector("h1 .state[data-state='STOPPING'], h1 .state[data-state='STOPPED']")
    assert stack.get(f"/v1/jobs/{long}")["state"] in ("STOPPING", "STOPPED")
    page.wait_for_selector("h1 .state[data-state='STOPPED']", timeout=60_000)
    page.wait_for_selector("#stream-status:has-text('ended STOPPED')")
    assert page.get_by_role("button", name="Resume").is_visible()
    assert stack.get(f"/v1/jobs/{long}")["state"] == "STOPPED"


def test_a_grown_jobs_curves_show_its_two_growth_markers_live(page, stack, jobs, shots):
    grown = jobs["grown"]
    page.goto(f"{stack.gw['url']}/console/#/jobs/{grown}")
    page.wait_for_selector(f"h1:has-text('{grown}')")
    page.wait_for_selector("h1 .state[data-state='SUCCEEDED']", timeout=WAIT_MS)  # followed on the open page
    page.wait_for_selector("#stream-status:has-text('ended SUCCEEDED')")
    records = stack.get(f"/v1/jobs/{grown}/metrics")["records"]
    growths = [r for r in records if r.get("event") == "growth"]
    assert [g["stage"] for g in growths] == [1, 2]
    for chart in ("#chart-tokens", "#chart-flops"):
        markers = page.locator(f"{chart} .growth-marker text").all_text_contents()
        assert len(markers) == 2, markers
        for text, g in zip(markers, growths, strict=True):
            assert f"stage {g['stage'] + 1}" in text and "|Δloss|" in text
        points = int(page.locator(f"{chart} .series.train").get_attribute("data-points"))
        assert points == sum("loss" in r for r in records) == 36  # every logged step of the three stages
        val = int(page.locator(f"{chart} .series.val").get_attribute("data-points"))
        assert val == sum("val_loss" in r for r in records) > 0
    events = page.locator("#growth-events tbody tr")
    assert events.count() == 2
    assert [events.nth(i).locator("td").nth(1).inner_text() for i in range(2)] == \
        [str(g["step"]) for g in growths] == ["12", "24"]
    stages = page.locator("#stages tbody tr")
    assert stages.count() == 3  # each stage trained all of its planned 4 x 32 x 12 tokens
    assert [stages.nth(k).locator("td").nth(2).inner_text() for k in range(3)] == ["1.54k / 1.54k"] * 3
    job = stack.get(f"/v1/jobs/{grown}")
    assert page.locator("ul.paths li").last.inner_text() == job["checkpoints"][-1]
    steps = page.locator("#steps tbody tr")
    assert [steps.nth(i).locator("td").nth(0).inner_text() for i in range(steps.count())] == \
        ["tune", "train", "eval", "deploy"]
    assert [steps.nth(i).locator(".state").get_attribute("data-state") for i in range(4)] == \
        ["SKIPPED", "SUCCEEDED", "SKIPPED", "SKIPPED"]
    page.get_by_role("button", name="Show the last 200 lines").click()
    page.wait_for_selector("pre.log:visible")
    driver_log = stack.get(f"/v1/jobs/{grown}/logs?tail=200")["logs"]
    assert page.locator("pre.log").text_content() == re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", driver_log) != ""
    shots(page, "console-job")
    page.get_by_label("Deployment name").fill("micro")
    page.get_by_label("TP", exact=True).fill("1")
    page.get_by_role("button", name="Deploy").click()
    page.wait_for_selector("#action-status:has-text('Deploy: done')")
    assert stack.get("/v1/deployments/micro")["job_id"] == grown
    assert not page.errors, page.errors


def test_playground_streams_a_completion_of_the_deployment(page, stack, jobs, shots):
    page.goto(f"{stack.gw['url']}/console/#/deployments")
    page.wait_for_selector("tr[data-deployment='micro'][data-state='RUNNING']", timeout=WAIT_MS)
    cells = page.locator("tr[data-deployment='micro'] td")
    assert (cells.nth(1).inner_text(), cells.nth(2).inner_text()) == ("1", "1")  # TP, replicas
    page.get_by_label("Model (a RUNNING deployment)").select_option("micro")
    page.get_by_label("Prompt").fill("ROMEO: What light")
    page.get_by_label("Max tokens").fill("16")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#pg-output[data-done='true']", timeout=60_000)
    text = page.locator("#pg-output").text_content()
    chunks = int(page.locator("#pg-output").get_attribute("data-chunks"))
    status = page.locator("#pg-status").inner_text()
    assert chunks > 1, (chunks, status)  # streamed: many server-sent events, not one answer
    r = stack.http.post("/v1/completions", json={"model": "micro", "prompt": "ROMEO: What light", "max_tokens": 16,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    assert text == r.json()["choices"][0]["text"] and text.strip(), (text, status)
    shots(page, "console-deployments")
    page.goto(f"{stack.gw['url']}/console/#/jobs")
    page.wait_for_selector(f"tr[data-job='{jobs['grown']}'][data-state='SUCCEEDED']")
    shots(page, "console-jobs")
    assert not page.errors, page.errors


def test_plan_page_prices_a_preset_and_names_a_bad_field(page, stack, shots):
    page.goto(f"{stack.gw['url']}/console/#/jobs")  # the page has the focus: the navigation is before it
    page.wait_for_selector("tr[data-job]")
    for _ in range(8):  # by keyboard: Shift+Tab back to the navigation's Plan link, Enter
        page.keyboard.press("Shift+Tab")
        if page.evaluate("document.activeElement.textContent") == "Plan":
            break
    page.keyboard.press("Enter")
    page.wait_for_selector("#plan-form")
    assert page.url.endswith("#/plan")
    page.get_by_label("Preset").select_option("flm-101b")
    page.get_by_role("button", name="Compute the cost").click()
    page.wait_for_selector("#plan-cost")
    cost = stack.http.post("/v1/plan", json={"plan": "flm-101b"}).json()
    rows = page.locator("#plan-cost tbody tr")
    assert rows.count() == len(cost["stages"]) + 2  # the stages, growth total, from scratch
    assert [rows.nth(i).locator("th").inner_text() for i in range(3)] == [s["name"] for s in cost["stages"]]
    assert f"{cost['time_saving'] * 100:.1f} %" in page.locator("#plan-saving").inner_text()
    shots(page, "console-plan")
    page.get_by_label("Plan (YAML, as in configs/)").fill("name: broken\nstages:\n  - tokens: 10\n")
    page.get_by_role("button", name="Compute the cost").click()
    page.wait_for_selector("#plan-out .error:has-text('plan.stages.0')")
    assert not page.errors, page.errors
