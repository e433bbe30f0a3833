// The console's shell: the sign-in form, the navigation and the hash router (#/jobs, #/jobs/<id>,
// #/deployments, #/plan). Each page's render() returns a function that stops its polling and streams.

import { apiKey, call, whenUnauthorized } from "./api.js";
import * as deployments from "./deployments.js";
import * as job from "./job.js";
import * as jobs from "./jobs.js";
import * as plan from "./plan.js";

const ROUTES = [
  [/^#\/jobs\/(job-[0-9a-f]{10})$/, job, "jobs"],
  [/^#\/jobs$/, jobs, "jobs"],
  [/^#\/deployments$/, deployments, "deployments"],
  [/^#\/plan$/, plan, "plan"],
];

const $ = (id) => document.getElementById(id);
let leave = () => {};

function show(signedIn) {
  $("login").hidden = signedIn;
  $("nav").hidden = !signedIn;
  $("logout").hidden = !signedIn;
  if (!signedIn) {
    leave();
    leave = () => {};
    $("page").replaceChildren();
    $("key").focus();
  }
}

function route() {
  if (!apiKey.get()) return show(false);
  show(true);
  const hash = location.hash || "#/jobs";
  const found = ROUTES.find(([re]) => re.test(hash));
  if (!found) {
    location.replace("#/jobs");
    return;
  }
  const [re, page, nav] = found;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  leave();
  const container = $("page");
  container.replaceChildren();
  leave = page.render(container, hash.match(re).slice(1));
  document.title = `${nav[0].toUpperCase()}${nav.slice(1)} · FLM console`;
  $("main").focus({ preventScroll: true });
}

async function signIn(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  $("login-error").textContent = "";
  apiKey.set(key);
  try {
    await call("GET", "/v1/jobs?limit=1");  // the cheapest call that proves the key
  } catch (e) {
    apiKey.forget();
    $("login-error").textContent = e.status === 401 ? `That key was not accepted: ${e.message}` : e.message;
    return;
  }
  $("key").value = "";
  route();
}

whenUnauthorized((e) => {
  apiKey.forget();
  show(false);
  $("login-error").textContent = `Signed out: ${e.message}`;
});

$("login-form").addEventListener("submit", signIn);
$("logout").addEventListener("click", () => {
  apiKey.forget();
  show(false);
});
window.addEventListener("hashchange", route);
route();
