// The web page: one form, POST /generate (response_format json), a gallery. No framework, no build step.
"use strict";

const API_KEY_STORAGE = "sd-serve.api-key";
const MAX_BUSY_RETRIES = 3; // 503 answers (server overloaded) are retried, honouring Retry-After
const NUMERIC_FIELDS = ["width", "height", "num_inference_steps", "guidance_scale", "seed", "num_images"];
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const button = $("generate");
const errorBox = $("error");
const gallery = $("gallery");
const apiKeyInput = $("api_key");

class ServerError extends Error {
  constructor(status, body, fallbackText) {
    const error = (body && body.error) || {};
    super(error.message || fallbackText || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || `http_${status}`;
    this.field = error.field || error.param || null;
    this.requestId = (body && body.request_id) || null;
  }
}

function authHeaders() {
  const key = apiKeyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(path, options = {}, onBusy = () => {}) {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (response.ok) return response.json();
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch { /* a proxy's plain-text answer */ }
    if (response.status === 503 && attempt < MAX_BUSY_RETRIES) {
      const retryAfter = Number.parseFloat(response.headers.get("Retry-After"));
      const waitS = Number.isFinite(retryAfter) ? Math.min(Math.max(retryAfter, 0), 60) : 2 ** attempt;
      onBusy(waitS);
      await sleep(waitS * 1000);
      continue;
    }
    throw new ServerError(response.status, body, text.trim().slice(0, 300));
  }
}

// -- server status and limits ------------------------------------------------------------

function setServerStatus(state, text) {
  $("server-status").dataset.state = state;
  $("server-text").textContent = text;
}

async function loadServerInfo() {
  let ready = null;
  try {
    const response = await fetch("/readyz", { headers: authHeaders() });
    if (response.status !== 404) ready = response.ok;
  } catch {
    setServerStatus("down", "server unreachable");
    return;
  }
  try {
    const info = await api("/info");
    applyInfo(info);
    const generator = info.generator || {};
    const where = generator.device ? ` · ${generator.device}` : "";
    if (ready === false) setServerStatus("waiting", `${info.model}${where} · warming up`);
    else setServerStatus("ready", `${info.model}${where}`);
  } catch (error) {
    setServerStatus(ready ? "ready" : "waiting", error.status === 401 || error.status === 403
      ? "API key needed" : "server info unavailable");
  }
}

function applyInfo(info) {
  const limits = info.limits || {};
  const generator = info.generator || {};
  const defaults = generator.defaults || {};
  // Defaults are placeholders, not values: an empty field lets the server choose.
  for (const name of ["width", "height", "num_inference_steps", "guidance_scale"]) {
    if (defaults[name] != null) $(name).placeholder = String(defaults[name]);
  }
  if (limits.max_num_images) $("num_images").max = limits.max_num_images;
  const select = $("scheduler");
  for (const name of generator.schedulers || []) {
    if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  }
  if (limits.max_width) {
    $("limits-hint").textContent =
      `Sizes ${limits.min_size}–${limits.max_width} × ${limits.min_size}–${limits.max_height}, multiples of 8; ` +
      `up to ${limits.max_steps} steps and ${limits.max_num_images} images.`;
  }
}

// -- generating --------------------------------------------------------------------------

function requestBody() {
  const data = new FormData(form);
  const body = { response_format: "json" };
  for (const [name, value] of data.entries()) {
    const text = String(value).trim();
    if (text === "") continue; // left empty: the server's default
    body[name] = NUMERIC_FIELDS.includes(name) ? Number(text) : text;
  }
  return body;
}

function setBusy(busy, message) {
  button.disabled = busy;
  button.setAttribute("aria-busy", String(busy));
  button.querySelector(".button-text").textContent = busy ? "Generating…" : "Generate";
  $("progress").textContent = message;
}

function showError(error) {
  errorBox.replaceChildren();
  errorBox.append(document.createTextNode(error.message));
  if (error.requestId || error.status) {
    const id = document.createElement("span");
    id.className = "error-id";
    id.textContent = [error.status && `${error.status} ${error.code}`, error.requestId && `request ${error.requestId}`]
      .filter(Boolean).join(" · ");
    errorBox.append(id);
  }
  errorBox.hidden = false;
  const input = error.field && form.elements.namedItem(error.field);
  if (input && input.setAttribute) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  if (error.status === 401 || error.status === 403) {
    $("connection").open = true;
    apiKeyInput.focus();
  }
}

function clearError() {
  errorBox.hidden = true;
  errorBox.replaceChildren();
  for (const element of form.querySelectorAll("[aria-invalid]")) element.removeAttribute("aria-invalid");
}

function pendingCards(count) {
  const cards = [];
  for (let i = 0; i < count; i++) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.classList.add("pending");
    card.querySelector(".card-actions").hidden = true;
    gallery.prepend(card);
    cards.push(card);
  }
  $("empty").hidden = true;
  return cards.reverse();
}

function base64ToBlob(b64, mediaType) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: mediaType });
}

function fillCard(card, image, metadata) {
  const url = URL.createObjectURL(base64ToBlob(image.b64, image.media_type));
  const img = card.querySelector("img");
  img.src = url;
  img.alt = `${metadata.prompt} (seed ${image.seed})`;
  card.style.setProperty("--aspect", `${metadata.width} / ${metadata.height}`);
  card.querySelector(".card-prompt").textContent = metadata.prompt;
  card.querySelector(".card-prompt").title = metadata.prompt;
  card.querySelector(".seed").textContent = `seed ${image.seed}`;
  card.querySelector(".details").textContent =
    `${metadata.width}×${metadata.height} · ${metadata.num_inference_steps} steps · batch of ${image.batch_size}`;
  const download = card.querySelector(".download");
  download.href = url;
  download.download = `sd-${image.seed}.${EXTENSIONS[image.media_type] || "png"}`;
  card.querySelector(".reuse").addEventListener("click", () => {
    $("seed").value = image.seed;
    $("seed").focus();
  });
  card.dataset.seed = String(image.seed);
  card.classList.remove("pending");
  card.querySelector(".card-actions").hidden = false;
}

async function generate(event) {
  event.preventDefault();
  if (button.disabled) return;
  clearError();
  const body = requestBody();
  const asked = Number.isInteger(body.num_images) ? body.num_images : 1;
  const count = Math.min(Math.max(asked, 1), 64); // placeholders only; the server enforces its own limit
  const started = performance.now();
  setBusy(true, "Waiting for the server…");
  const timer = setInterval(() => {
    $("progress").textContent = `Generating… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }, 100);
  const cards = pendingCards(count);
  try {
    const result = await api(
      "/generate",
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) },
      (waitS) => { $("progress").textContent = `Server busy, trying again in ${waitS} s…`; },
    );
    result.images.forEach((image, i) => fillCard(cards[i], image, result.metadata));
    cards.slice(result.images.length).forEach((card) => card.remove());
    $("clear").hidden = false;
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const warnings = result.metadata.warnings.length ? ` · ${result.metadata.warnings.join("; ")}` : "";
    clearInterval(timer);
    setBusy(false, `${result.images.length} image${result.images.length > 1 ? "s" : ""} in ${seconds} s${warnings}`);
  } catch (error) {
    clearInterval(timer);
    cards.forEach((card) => card.remove());
    $("empty").hidden = gallery.children.length > 0;
    setBusy(false, "Ctrl + Enter generates");
    showError(error instanceof ServerError ? error : { message: `Could not reach the server: ${error.message}` });
  }
}

// -- wiring ------------------------------------------------------------------------------

apiKeyInput.value = localStorage.getItem(API_KEY_STORAGE) || "";
apiKeyInput.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, apiKeyInput.value.trim());
  loadServerInfo();
});
form.addEventListener("submit", generate);
form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
form.addEventListener("input", (event) => event.target.removeAttribute("aria-invalid"));
$("clear").addEventListener("click", () => {
  for (const img of gallery.querySelectorAll("img[src^='blob:']")) URL.revokeObjectURL(img.src);
  gallery.replaceChildren();
  $("clear").hidden = true;
  $("empty").hidden = false;
});
loadServerInfo();
