// The web page: one form, jobs (POST /jobs, their events, their images), a gallery. No framework, no build step.
"use strict";

const API_KEY_STORAGE = "sd-serve.api-key";
const JOBS_STORAGE = "sd-serve.jobs"; // the ids of the jobs this browser submitted, oldest first
const MAX_REMEMBERED_JOBS = 12;
const MAX_BUSY_RETRIES = 3; // 503 answers (server overloaded) are retried, honouring Retry-After
const MAX_FOLLOWS = 20; // event streams opened for one job before the page gives up on it
const REFOLLOW_PAUSE_MS = 1000; // before opening a job's stream again (as the Python client waits)
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
  const generator = info.generator || {};
  applyDefaultsAndLimits(generator.defaults || {}, info.limits || {});
  const select = $("scheduler");
  for (const name of generator.schedulers || []) {
    if (![...select.options].some((o) => o.value === name)) select.add(new Option(name, name));
  }
}

function applyDefaultsAndLimits(defaults, limits) {
  // Defaults are placeholders, not values: an empty field lets the server choose.
  for (const name of ["width", "height", "num_inference_steps", "guidance_scale"]) {
    if (defaults[name] != null) $(name).placeholder = String(defaults[name]);
  }
  if (limits.max_num_images) $("num_images").max = limits.max_num_images;
  if (limits.max_width) {
    $("limits-hint").textContent =
      `Sizes ${limits.min_size}–${limits.max_width} × ${limits.min_size}–${limits.max_height}, multiples of 8; ` +
      `up to ${limits.max_steps} steps and ${limits.max_num_images} images.`;
  }
}

// -- models and LoRA adapters: offered only when the server has a choice --------------------

const models = new Map(); // id -> {defaults, limits} from GET /models

async function loadModels() {
  let listing;
  try { listing = await api("/models"); } catch { return; }
  const select = $("model");
  select.replaceChildren();
  for (const model of listing.models || []) {
    models.set(model.id, model);
    select.add(new Option(model.id === listing.default ? `${model.id} (default)` : model.id, model.id));
  }
  const several = models.size > 1;
  $("model-field").hidden = !several;
  select.disabled = !several; // a disabled select is not sent: one model needs no naming
}

function applyModel() {
  const model = models.get($("model").value);
  if (model) applyDefaultsAndLimits(model.defaults || {}, model.limits || {});
  applyControlnets();
}

// -- ControlNet: offered for the models that serve any (GET /controlnets) --------------------------

let controlnets = {}; // model id -> [{name, source}]
let controlDataUrl = null; // the control image as the file's own data: URL

async function loadControlnets() {
  let listing;
  try { listing = await api("/controlnets"); } catch { return; }
  controlnets = Object.fromEntries(
    Object.entries(listing.models || {}).map(([id, entry]) => [id, entry.controlnets || []]));
  applyControlnets();
}

function applyControlnets() {
  const select = $("model");
  const model = select.disabled ? Object.keys(controlnets)[0] : select.value;
  const offered = controlnets[model] || [];
  const names = $("controlnet-name");
  const chosen = names.value;
  names.replaceChildren(...offered.map((entry) => new Option(entry.name, entry.name)));
  if (offered.some((entry) => entry.name === chosen)) names.value = chosen;
  $("control").hidden = offered.length === 0;
}

function loadControlImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    controlDataUrl = reader.result;
    $("control-preview").src = reader.result;
    $("control-area").hidden = false;
  };
  reader.readAsDataURL(file);
}

function removeControlImage() {
  controlDataUrl = null;
  $("control-file").value = "";
  $("control-area").hidden = true;
}

function controlFields() {
  if (!controlDataUrl || $("control").hidden || !$("controlnet-name").value) return {};
  const unit = { name: $("controlnet-name").value, image: controlDataUrl };
  const scale = Number.parseFloat($("control-scale").value);
  if (Number.isFinite(scale)) unit.scale = scale;
  if ($("control-preprocess").value !== "none") unit.preprocess = $("control-preprocess").value;
  return { controlnet: [unit] };
}

async function loadLoras() {
  let listing;
  try { listing = await api("/loras"); } catch { return; }
  const rows = (listing.loras || []).map((lora) => {
    const row = $("lora-template").content.firstElementChild.cloneNode(true);
    row.dataset.lora = lora.name;
    row.querySelector(".lora-name").textContent = lora.name;
    row.querySelector(".lora-use").setAttribute("aria-label", `apply ${lora.name}`);
    row.querySelector(".lora-scale").setAttribute("aria-label", `scale of ${lora.name}`);
    return row;
  });
  $("loras").replaceChildren(...rows);
  $("loras-field").hidden = rows.length === 0;
}

function chosenLoras() {
  return [...$("loras").querySelectorAll(".lora")]
    .filter((row) => row.querySelector(".lora-use").checked)
    .map((row) => {
      const scale = Number.parseFloat(row.querySelector(".lora-scale").value);
      return { name: row.dataset.lora, scale: Number.isFinite(scale) ? scale : 1 };
    });
}

// -- generating: every request is a job (POST /jobs), followed through its events -------------

const jobCards = new Map(); // job id -> its card group, so a job is shown once

function requestBody() {
  const data = new FormData(form);
  const body = {};
  for (const [name, value] of data.entries()) {
    const text = String(value).trim();
    if (text === "" || ["output_format", "preview", "brush-mode"].includes(name)) continue; // empty: the default
    body[name] = NUMERIC_FIELDS.includes(name) ? Number(text) : text;
  }
  if ($("preview").checked) body.preview_every = 1;
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  Object.assign(body, editFields(), controlFields());
  return body;
}

// -- image to image: the init image, a mask brush over it, outpaint margins ----------------------

const editImage = $("edit-image");
const maskCanvas = $("mask-canvas");
const maskContext = maskCanvas.getContext("2d");
let initDataUrl = null; // the init image as the file's own data: URL (sent as it is)
let painting = null; // the last point of the stroke being drawn

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const picture = new Image();
    picture.onload = () => {
      for (const canvas of [editImage, maskCanvas]) {
        canvas.width = picture.naturalWidth;
        canvas.height = picture.naturalHeight;
      }
      editImage.getContext("2d").drawImage(picture, 0, 0);
      initDataUrl = reader.result;
      $("edit-area").hidden = false;
      $("canvas-stack").style.aspectRatio = `${picture.naturalWidth} / ${picture.naturalHeight}`;
    };
    picture.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function removeInitImage() {
  initDataUrl = null;
  $("init-file").value = "";
  maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  $("edit-area").hidden = true;
}

function canvasPoint(event) {
  const rect = maskCanvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * maskCanvas.width) / rect.width,
    y: ((event.clientY - rect.top) * maskCanvas.height) / rect.height,
  };
}

function brushTo(point) {
  const rect = maskCanvas.getBoundingClientRect();
  maskContext.globalCompositeOperation = $("brush-erase").checked ? "destination-out" : "source-over";
  maskContext.strokeStyle = maskContext.fillStyle = "#ffffff";
  maskContext.lineCap = maskContext.lineJoin = "round";
  // The brush size is in screen pixels: the same stroke whatever the image's own size.
  maskContext.lineWidth = (Number($("brush-size").value) * maskCanvas.width) / rect.width;
  maskContext.beginPath();
  maskContext.moveTo(painting.x, painting.y);
  maskContext.lineTo(point.x, point.y);
  maskContext.stroke();
  painting = point;
}

function maskPainted() {
  if (!maskCanvas.width) return false;
  const alpha = maskContext.getImageData(0, 0, maskCanvas.width, maskCanvas.height).data;
  for (let i = 3; i < alpha.length; i += 4) if (alpha[i]) return true;
  return false;
}

// The mask as the API takes it: white where painted, black elsewhere, the image's size. Binary: the brush's
// anti-aliased rim is in or out (the server's mask blur is what softens an edge).
function maskDataUrl() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width;
  out.height = maskCanvas.height;
  const pixels = maskContext.getImageData(0, 0, out.width, out.height);
  const data = pixels.data;
  for (let i = 0; i < data.length; i += 4) {
    const value = data[i + 3] >= 128 ? 255 : 0;
    data[i] = data[i + 1] = data[i + 2] = value;
    data[i + 3] = 255;
  }
  out.getContext("2d").putImageData(pixels, 0, 0);
  return out.toDataURL("image/png");
}

function editFields() {
  if (!initDataUrl) return {};
  const body = { init_image: initDataUrl };
  const strength = Number.parseFloat($("strength").value);
  if (Number.isFinite(strength)) body.strength = strength;
  const outpaint = {};
  for (const side of ["left", "right", "top", "bottom"]) {
    const pixels = Number.parseInt($(`outpaint-${side}`).value, 10);
    if (pixels > 0) outpaint[side] = pixels;
  }
  if (Object.keys(outpaint).length) body.outpaint = outpaint;
  const masked = maskPainted();
  if (masked) body.mask = maskDataUrl();
  if (masked || body.outpaint) {
    const blur = Number.parseInt($("mask_blur").value, 10);
    if (Number.isFinite(blur)) body.mask_blur = blur;
    if ($("fill").value !== "original") body.fill = $("fill").value;
    if (!$("paste_back").checked) body.paste_back = false;
  }
  return body;
}

function setBusy(busy, message) {
  button.disabled = busy;
  button.setAttribute("aria-busy", String(busy));
  button.querySelector(".button-text").textContent = busy ? "Submitting…" : "Generate";
  if (message !== undefined) $("progress").textContent = message;
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

// One group per job: a header with its progress bar, preview and cancel button, then a card per image.
function jobGroup(job) {
  if (jobCards.has(job.id)) return jobCards.get(job.id);
  const group = $("job-template").content.firstElementChild.cloneNode(true);
  group.dataset.job = job.id;
  group.querySelector(".job-prompt").textContent = job.params.prompt;
  group.querySelector(".cancel").addEventListener("click", () => cancelJob(job.id));
  const cards = [];
  for (let i = 0; i < job.seeds.length; i++) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.classList.add("pending");
    card.querySelector(".card-actions").hidden = true;
    group.querySelector(".job-images").append(card);
    cards.push(card);
  }
  const entry = { group, cards, job };
  jobCards.set(job.id, entry);
  gallery.prepend(group);
  $("empty").hidden = true;
  $("clear").hidden = false;
  return entry;
}

function showState(entry, status, text) {
  entry.group.dataset.status = status;
  entry.group.querySelector(".job-state").textContent = text;
  entry.group.querySelector(".cancel").hidden = !["queued", "running"].includes(status);
}

function showProgress(entry, progress) {
  const fraction = progress.total_steps ? progress.step / progress.total_steps : 0;
  const bar = entry.group.querySelector("progress");
  bar.value = fraction;
  bar.hidden = false;
  showState(entry, "running",
    `step ${progress.step} of ${progress.total_steps} · ${progress.images_done}/${progress.num_images} images`);
}

function showPreview(entry, b64) {
  const img = entry.group.querySelector(".job-preview");
  img.src = `data:image/png;base64,${b64}`;
  img.hidden = false;
}

async function fetchImage(jobId, index, format) {
  const response = await fetch(`/jobs/${jobId}/images/${index}?format=${format}`, { headers: authHeaders() });
  if (!response.ok) throw new ServerError(response.status, await response.json().catch(() => null));
  return response.blob();
}

async function showImages(entry, job) {
  const format = $("output_format").value;
  entry.group.querySelector("progress").hidden = true;
  entry.group.querySelector(".job-preview").hidden = true;
  const seconds = job.finished_at && job.started_at ? ` in ${(job.finished_at - job.started_at).toFixed(1)} s` : "";
  showState(entry, "succeeded", `done${seconds}`);
  await Promise.all(job.images.map(async (image, i) => {
    const blob = await fetchImage(job.id, image.index, format);
    fillCard(entry.cards[i], blob, image);
  }));
}

function fillCard(card, blob, image) {
  const metadata = image.metadata;
  const url = URL.createObjectURL(blob);
  const img = card.querySelector("img");
  img.src = url;
  img.alt = `${metadata.prompt} (seed ${image.seed})`;
  card.style.setProperty("--aspect", `${metadata.width} / ${metadata.height}`);
  card.querySelector(".card-prompt").textContent = metadata.prompt;
  card.querySelector(".card-prompt").title = metadata.prompt;
  card.querySelector(".seed").textContent = `seed ${image.seed}`;
  const adapters = (metadata.loras || []).map((lora) => `${lora.name} ${lora.scale}`).join(", ");
  const controls = (metadata.controlnet || []).map((unit) => `${unit.name} ${unit.scale}`).join(", ");
  card.querySelector(".details").textContent =
    `${metadata.width}×${metadata.height} · ${metadata.num_inference_steps} steps · batch of ${metadata.batch_size}` +
    (models.size > 1 && metadata.model ? ` · ${metadata.model}` : "") + (adapters ? ` · LoRA ${adapters}` : "") +
    (controls ? ` · ControlNet ${controls}` : "");
  const download = card.querySelector(".download");
  download.href = url;
  download.download = `sd-${image.seed}.${EXTENSIONS[blob.type] || "png"}`;
  card.querySelector(".reuse").addEventListener("click", () => {
    $("seed").value = image.seed;
    $("seed").focus();
  });
  card.dataset.seed = String(image.seed);
  card.classList.remove("pending");
  card.querySelector(".card-actions").hidden = false;
}

// Server-sent events through fetch (EventSource cannot send the API key).
async function* jobEvents(jobId) {
  const response = await fetch(`/jobs/${jobId}/events`, { headers: authHeaders() });
  if (!response.ok) throw new ServerError(response.status, await response.json().catch(() => null));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const kind = (block.match(/^event: (.*)$/m) || [])[1] || "message";
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (data) yield [kind, JSON.parse(data)];
    }
  }
}

// A final state: the images, or why there are none. Returns whether `status` was final.
async function showFinal(entry, status, job) {
  if (status === "succeeded") await showImages(entry, job);
  else if (status === "failed") showState(entry, "failed", `failed: ${job.error ? job.error.message : "unknown error"}`);
  else if (status === "canceled") showState(entry, "canceled", "canceled");
  else return false;
  if (status !== "succeeded") entry.cards.forEach((card) => card.remove());
  return true;
}

async function follow(job) {
  const entry = jobGroup(job);
  showState(entry, job.status, job.status === "queued" && job.position ? `queued (${job.position} ahead)` : job.status);
  try {
    // A stream may end before its job does (a proxy's idle time-out, a restarted queue holder):
    // the job is read again and, while unfinished, followed again.
    for (let attempt = 0; attempt < MAX_FOLLOWS; attempt++) {
      for await (const [kind, data] of jobEvents(job.id)) {
        if (kind === "queued") showState(entry, "queued", `queued (position ${data.position})`);
        else if (kind === "running") showState(entry, "running", "running");
        else if (kind === "progress") showProgress(entry, data);
        else if (kind === "preview") showPreview(entry, data.image);
        else if (await showFinal(entry, kind, data)) return;
      }
      const now = await api(`/jobs/${encodeURIComponent(job.id)}`);
      if (await showFinal(entry, now.status, now)) return;
      await sleep(REFOLLOW_PAUSE_MS);
    }
    showState(entry, "unknown", "lost track of this job: its event stream kept ending");
  } catch (error) {
    showState(entry, "unknown", `lost track of this job: ${error.message}`);
  }
}

async function cancelJob(jobId) {
  try {
    await api(`/jobs/${jobId}`, { method: "DELETE" });
  } catch (error) {
    showError(error instanceof ServerError ? error : { message: error.message });
  }
}

async function generate(event) {
  event.preventDefault();
  if (button.disabled) return;
  clearError();
  setBusy(true, "Submitting…");
  try {
    const job = await api(
      "/jobs",
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()) },
      (waitS) => { $("progress").textContent = `Server busy, trying again in ${waitS} s…`; },
    );
    setBusy(false, "Submitted: you can submit more while it runs");
    rememberJob(job.id);
    follow(job);
  } catch (error) {
    setBusy(false, "Ctrl + Enter generates");
    showError(error instanceof ServerError ? error : { message: `Could not reach the server: ${error.message}` });
  }
}

// Jobs survive a reload: this browser's recent jobs (their ids are kept in localStorage, not
// everyone's jobs from GET /jobs) are shown again, and the unfinished ones followed.
function rememberedJobs() {
  try {
    const ids = JSON.parse(localStorage.getItem(JOBS_STORAGE) || "[]");
    return Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : [];
  } catch { return []; }
}

function rememberJob(id) {
  const ids = rememberedJobs().filter((known) => known !== id);
  ids.push(id);
  localStorage.setItem(JOBS_STORAGE, JSON.stringify(ids.slice(-MAX_REMEMBERED_JOBS)));
}

function forgetJob(id) {
  localStorage.setItem(JOBS_STORAGE, JSON.stringify(rememberedJobs().filter((known) => known !== id)));
}

async function loadRecentJobs() {
  for (const id of rememberedJobs()) { // oldest first: each job's group goes on top of the last
    try {
      const job = await api(`/jobs/${encodeURIComponent(id)}`);
      if (job.status === "queued" || job.status === "running") follow(job);
      else showFinal(jobGroup(job), job.status, job).catch(() => {});
    } catch (error) {
      if (error.status === 404 || error.status === 410) forgetJob(id); // expired, or another key's
    }
  }
}

// -- wiring ------------------------------------------------------------------------------

apiKeyInput.value = localStorage.getItem(API_KEY_STORAGE) || "";
apiKeyInput.addEventListener("change", () => {
  localStorage.setItem(API_KEY_STORAGE, apiKeyInput.value.trim());
  loadServerInfo();
  loadModels().then(loadControlnets);
  loadLoras();
});
$("model").addEventListener("change", applyModel);
$("init-file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) loadInitImage(file);
});
$("init-remove").addEventListener("click", removeInitImage);
$("control-file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) loadControlImage(file);
});
$("control-remove").addEventListener("click", removeControlImage);
$("mask-clear").addEventListener("click", () => maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height));
maskCanvas.addEventListener("pointerdown", (event) => {
  maskCanvas.setPointerCapture(event.pointerId);
  painting = canvasPoint(event);
  brushTo(painting); // a click paints a dot
});
maskCanvas.addEventListener("pointermove", (event) => { if (painting) brushTo(canvasPoint(event)); });
for (const end of ["pointerup", "pointercancel"]) maskCanvas.addEventListener(end, () => { painting = null; });
form.addEventListener("submit", generate);
form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
form.addEventListener("input", (event) => event.target.removeAttribute("aria-invalid"));
$("clear").addEventListener("click", () => {
  for (const img of gallery.querySelectorAll("img[src^='blob:']")) URL.revokeObjectURL(img.src);
  gallery.replaceChildren();
  jobCards.clear();
  localStorage.removeItem(JOBS_STORAGE);
  $("clear").hidden = true;
  $("empty").hidden = false;
});
// Marked once the first loads are in: the sections they show move the form (the browser tests wait for it).
Promise.allSettled([loadServerInfo(), loadModels().then(loadControlnets), loadLoras(), loadRecentJobs()])
  .then(() => { document.documentElement.dataset.loaded = "true"; });
