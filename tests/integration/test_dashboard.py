"""The dashboard, served by the gateway, driven in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium) against the real job path: sign in, submit a job from the
page and see it reach SUCCEEDED live, approve a held job as another operator, retry a DLQ entry,
watch a stopped scheduler leave the cluster view; a viewer's key sees but is offered no action.
The page's headers and files are checked without a browser too."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import http.client

import pytest
import trio

from cordum.cli.http import Client
from tests.integration import stack as stack_module
from tests.integration.stack import Stack, gateway_stack
from tests.integration.test_gateway import ADMIN, ALICE, BOB, VIEWER, _keys_file
from tests.integration.test_gateway_workflows import eventually

redis_server, nats_server = stack_module.redis_server, stack_module.nats_server

WAIT = 60  # process start-up and a browser on a loaded 2-core machine
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
async def gateway(spawn, tmp_path) -> tuple[Stack, str]:
    stack = Stack.create(spawn, tmp_path)
    base = await gateway_stack(stack, schedulers=2, workflow_engine=True, timeout=WAIT, CORDUM_API_KEY=ADMIN,
                               CORDUM_API_KEYS_PATH=str(_keys_file(tmp_path)))
    return stack, base


def _raw_get(base: str, path: str) -> tuple[int, dict[str, str], str]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


async def test_the_page_is_served_with_a_strict_policy_and_holds_no_data(gateway):
    _, base = gateway

    async def get(path: str) -> tuple[int, dict[str, str], str]:
        return await trio.to_thread.run_sync(_raw_get, base, path)

    status, headers, _ = await get("/")
    assert status == 302 and headers["location"].endswith("/dashboard/")
    status, headers, page = await get("/dashboard/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert headers["x-frame-options"] == "DENY"
    assert '<script src="app.js"' in page and "<script>" not in page  # no inline script
    status, headers, script = await get("/dashboard/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script  # API data goes in as text only
    assert (await get("/dashboard/app.css"))[0] == 200
    assert (await get("/dashboard/nothing.js"))[0] == 404
    assert (await get("/dashboard/%2e%2e/pyproject.toml"))[0] == 404


async def test_status_names_the_caller_and_the_leaders_to_operator_admins(gateway):
    _, base = gateway
    admin = await trio.to_thread.run_sync(lambda: Client(base, api_key=ADMIN, timeout=10).get("/api/v1/status"))
    assert admin["caller"] == {"tenant": "default", "role": "admin", "principal_id": ""}

    async def leaders_known():
        status = await trio.to_thread.run_sync(lambda: Client(base, api_key=ADMIN, timeout=10).get("/api/v1/status"))
        held = status["leaders"]
        return held if held["reconciler"] in ("scheduler-1", "scheduler-2") else None

    held = await eventually(leaders_known, WAIT, what="a reconciler leader in status")
    assert held["dlq_cleanup"] == "gateway-1"
    lag = {(d["queue"], d["subject"]): d for d in admin["stream_lag"]}
    assert lag[("cordum-scheduler", "sys.job.submit")]["pending"] == 0  # idle: nothing waits
    viewer = await trio.to_thread.run_sync(lambda: Client(base, api_key=VIEWER, timeout=10).get("/api/v1/status"))
    assert viewer["caller"] == {"tenant": "default", "role": "viewer", "principal_id": "vic"}
    assert "leaders" not in viewer and "replicas" not in viewer and "stream_lag" not in viewer


# ---- in the browser ------------------------------------------------------------------------------


def _browser(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1366,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


class Page:
    """The dashboard in one browser tab; every wait polls the page (it updates itself)."""

    def __init__(self, driver, base: str) -> None:
        self.driver, self.base = driver, base

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, what: str, predicate, timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = predicate()
            except Exception:  # an element replaced by a refresh between find and read
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                error = [e.text for e in self.find("#error") if e.is_displayed()]
                raise AssertionError(f"timed out waiting for {what} (page error: {error}; view: {self.view_text()[:600]})")
            time.sleep(0.1)

    def act(self, what: str, action) -> None:
        """Do `action` (find and click, type) again if the live page replaced an element under it,
        as a person would click again."""
        from selenium.common.exceptions import StaleElementReferenceException

        def attempt() -> bool:
            try:
                action()
            except StaleElementReferenceException:
                return False
            return True

        self.wait(what, attempt)

    def fill(self, css: str, text: str) -> None:
        def typed() -> None:
            field = self.find(css)[0]
            field.clear()
            field.send_keys(text)

        self.act(f"typing into {css}", typed)

    def click(self, css: str) -> None:
        self.act(f"clicking {css}", lambda: self.find(css)[0].click())

    def view_text(self) -> str:
        views = self.find("#view")
        return views[0].text if views else ""

    def sign_in(self, key: str) -> None:
        self.driver.get(self.base + "/dashboard/")
        self.wait("the sign-in form", lambda: self.find("#key") and self.find("#key")[0].is_displayed())
        self.find("#key")[0].send_keys(key)
        self.find("#signin-form button")[0].click()
        self.wait("the navigation", lambda: self.find("#nav") and self.find("#nav")[0].is_displayed())

    def sign_out(self) -> None:
        self.find("#signout")[0].click()
        self.wait("the sign-in form", lambda: self.find("#key")[0].is_displayed())

    def go(self, hash_: str) -> None:
        self.driver.execute_script("location.hash = arguments[0]", hash_)


def _run_in_browser(tmp_path: Path, base: str, scenario) -> None:
    driver = _browser(tmp_path)
    try:
        scenario(Page(driver, base))
    except BaseException:
        driver.save_screenshot(str(tmp_path / "dashboard-failure.png"))
        raise
    finally:
        driver.quit()


async def test_a_user_works_the_job_path_from_the_dashboard(gateway, tmp_path):
    stack, base = gateway
    api = Client(base, api_key=ADMIN, timeout=10)

    def scenario(page: Page) -> None:
        # Sign in; the key is in the tab's session, not in the URL.
        page.sign_in(ALICE)
        assert ALICE not in page.driver.current_url
        assert "default · operator · alice" in page.find("#who")[0].text
        page.wait("the live stream", lambda: page.find("#live")[0].text == "live")

        # Submit from the page: the job's page follows it to SUCCEEDED without a reload.
        page.fill("#submit-topic", "job.default")
        page.fill("#submit-prompt", "from the dashboard")
        page.fill("#submit-input", '{"note": "typed in a browser"}')
        page.click("#submit-form button")
        page.wait("the job's page", lambda: page.find("#job-state"))
        job_id = page.driver.current_url.rsplit("/", 1)[1]
        page.wait("SUCCEEDED, live", lambda: page.find("#job-state")[0].text == "SUCCEEDED")
        assert api.get(f"/api/v1/jobs/{job_id}")["state"] == "SUCCEEDED"
        assert "typed in a browser" in page.view_text()  # the input, shown with the job

        # A held job, submitted by alice, approved by bob (nobody approves their own job).
        page.go("#/jobs")
        page.wait("the submit form", lambda: page.find("#submit-topic"))
        page.fill("#submit-topic", "job.approve")
        page.fill("#submit-prompt", "needs a human")
        page.click("#submit-form button")
        page.wait("the held job's page", lambda: page.find("#job-state") and page.find("#job-state")[0].text == "APPROVAL_REQUIRED")
        held = page.driver.current_url.rsplit("/", 1)[1]
        page.sign_out()
        page.sign_in(BOB)
        page.go("#/approvals")
        page.wait("the held job in approvals", lambda: page.find(f'tr[data-job="{held}"]'))
        page.fill(f'tr[data-job="{held}"] input', "looks fine")
        page.click(f'tr[data-job="{held}"] button.approve')
        page.wait("the approved job to leave the list", lambda: not page.find(f'tr[data-job="{held}"]')
                  and page.find("#view")[0].get_attribute("data-view") == "approvals")
        page.go(f"#/jobs/{held}")
        page.wait("the approved job to finish", lambda: page.find("#job-state") and page.find("#job-state")[0].text == "SUCCEEDED")
        assert "bob" in page.view_text()  # the approver is shown
        stored = api.get(f"/api/v1/jobs/{held}")
        assert stored["approval_by"] == "bob" and stored["approval_reason"] == "looks fine" and stored["state"] == "SUCCEEDED"

        # A failed job's DLQ entry, retried from the page.
        failed = api.post("/api/v1/jobs", {"topic": "job.default", "prompt": "fail", "context": {"fail": True}})["job_id"]
        page.go("#/dlq")
        page.wait("the failed job in the DLQ", lambda: page.find(f'tr[data-job="{failed}"]'))
        page.click(f'tr[data-job="{failed}"] button.retry')
        page.wait("the retried entry to leave the DLQ view", lambda: not page.find(f'tr[data-job="{failed}"]'))
        assert api.get(f"/api/v1/jobs/{failed}")["retried_as"]

        # A workflow run: its steps as a DAG, coloured by status as it runs.
        flow = api.post("/api/v1/workflows", {"name": "two steps", "steps": {
            "fetch": {"type": "worker", "topic": "job.default"},
            "act": {"type": "worker", "topic": "job.default", "depends_on": ["fetch"]}}})["id"]
        run_id = api.post(f"/api/v1/workflows/{flow}/runs", {"input": {"n": 1}})["run_id"]
        page.go("#/runs")
        page.wait("the run in the list", lambda: page.find(f'tr[data-run="{run_id}"]'))
        page.click(f'tr[data-run="{run_id}"]')
        page.wait("both steps done in the DAG", lambda: len(page.find(".dag .step.SUCCEEDED")) == 2)
        layers = page.find(".dag .layer")
        assert [layer.text.split()[0] for layer in layers] == ["fetch", "act"]  # act depends on fetch: right of it
        page.wait("the run's status", lambda: "SUCCEEDED" in page.find("#run-status")[0].text)

        # The cluster view: both schedulers, then one fewer after a stop (admins of the operator tenant).
        page.sign_out()
        page.sign_in(ADMIN)
        page.go("#/cluster")
        page.wait("both schedulers", lambda: page.find('[data-replica="scheduler-1"]') and page.find('[data-replica="scheduler-2"]'))
        page.wait("the stream lag", lambda: page.find('tr[data-durable="cordum-scheduler/sys.job.submit"]'))
        page.wait("a reconciler leader", lambda: page.find('tr[data-loop="reconciler"]')
                  and "scheduler-" in page.find('tr[data-loop="reconciler"]')[0].text)
        stack.procs["scheduler-2"].signal(signal.SIGTERM)
        page.wait("scheduler-2 to leave the cluster view", lambda: page.find('[data-replica="scheduler-1"]')
                  and not page.find('[data-replica="scheduler-2"]'))
        page.driver.save_screenshot(str(tmp_path / "dashboard-cluster.png"))

        # A viewer sees the jobs but is offered no action.
        page.sign_out()
        page.sign_in(VIEWER)
        page.go("#/jobs")
        page.wait("the job list", lambda: page.find(f'tr[data-job="{job_id}"]'))
        assert not page.find("#submit-form")
        page.go("#/dlq")
        page.wait("the DLQ view", lambda: page.find("#view")[0].get_attribute("data-view") == "dlq")
        assert not page.find("button.retry") and not page.find("button.delete")

    await trio.to_thread.run_sync(_run_in_browser, tmp_path, base, scenario)


def test_the_browser_parts_are_installed():
    # scripts/install.sh installs them for the tests: a missing browser fails here, never skips.
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "apt-get install chromium chromium-driver"


async def test_an_oidc_user_signs_in_with_a_token_and_gets_the_live_stream(spawn, tmp_path):
    from tests.integration.test_gateway_oidc import AUDIENCE, Issuer

    issuer = Issuer()
    try:
        stack = Stack.create(spawn, tmp_path)
        stack.kernel()
        stack.start("gateway-1", "cordum.gateway.service", CORDUM_API_KEY=ADMIN,
                    CORDUM_OIDC_ISSUER=issuer.url, CORDUM_OIDC_AUDIENCE=AUDIENCE)
        await stack.ready(timeout=WAIT)
        base = f"http://127.0.0.1:{stack.http_ports['gateway-1']}"
        token = issuer.token(tenant="acme", role="operator")

        def scenario(page: Page) -> None:
            page.sign_in(token)
            assert "acme · operator · user-42" in page.find("#who")[0].text
            page.wait("the live stream, opened with the token", lambda: page.find("#live")[0].text == "live")
            page.wait("the submit form (an operator may submit)", lambda: page.find("#submit-form"))

        await trio.to_thread.run_sync(_run_in_browser, tmp_path, base, scenario)
    finally:
        issuer.server.shutdown()


async def test_without_the_stream_the_page_polls(spawn, tmp_path):
    """A stream refused (here: the tenant's one stream on this replica is taken) leaves the page
    polling: a job submitted elsewhere still shows up, and the stream is retried with a backoff."""
    from cordum.cli.ws import WebSocketClient, stream_url

    base = await gateway_stack(Stack.create(spawn, tmp_path), timeout=WAIT, CORDUM_API_KEY=ADMIN,
                               CORDUM_WS_MAX_CONNECTIONS_PER_TENANT="1")
    taken = WebSocketClient(stream_url(base), headers={"X-API-Key": ADMIN}, timeout=10)
    await trio.to_thread.run_sync(taken.connect)
    api = Client(base, api_key=ADMIN, timeout=10)

    def scenario(page: Page) -> None:
        page.sign_in(ADMIN)
        page.go("#/jobs")
        page.wait("the jobs view", lambda: page.find("#view")[0].get_attribute("data-view") == "jobs")
        time.sleep(1.0)  # the stream's first attempt is refused by now
        assert page.find("#live")[0].text == "polling"
        job_id = api.post("/api/v1/jobs", {"topic": "job.default", "prompt": "seen by polling"})["job_id"]
        page.wait("the job, by polling", lambda: page.find(f'tr[data-job="{job_id}"]'), timeout=30)

    try:
        await trio.to_thread.run_sync(_run_in_browser, tmp_path, base, scenario)
    finally:
        taken.close()
