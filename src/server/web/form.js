/* global document, FileReader */
/**
 * The generate form: its choices and ranges from GET /info, the request body of POST /jobs read from it (named as
 * the API names them; an empty seed means random), the init image as a data: URL, and the form filled back from
 * an image's parameters ("Use these settings").
 */

const $ = (id) => /** @type {any} */ (document.getElementById(id));

/** The init image chosen, as a data: URL (the API accepts the prefix), or null. */
let initImage = null;

/** Samplers, defaults and ranges of the loaded model. @param {any} info the answer of GET /info */
export function applyInfo(info) {
  const select = $('sampler');
  const chosen = select.value || info.defaults.sampler;
  select.replaceChildren(
    ...info.samplers.map((name) => {
      const o = document.createElement('option');
      o.value = name;
      o.textContent = name;
      return o;
    }),
  );
  select.value = info.samplers.includes(chosen) ? chosen : info.defaults.sampler;
  const r = info.ranges;
  for (const id of ['width', 'height']) {
    Object.assign($(id), { min: r.size.min, max: r.size.max, step: r.size.multiple_of });
    if ($(id).value === '') $(id).value = info.defaults[id];
  }
  Object.assign($('steps'), { min: r.steps.min, max: r.steps.max });
  Object.assign($('scale'), { min: r.scale.min, max: r.scale.max });
  Object.assign($('seed'), { min: r.seed.min, max: r.seed.max });
  $('prompt').maxLength = r.prompt_chars;
  $('negative_prompt').maxLength = r.prompt_chars;
}

/** @param {string} id @returns {number | undefined} */
function numberField(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

/**
 * The body of POST /jobs, or a message naming the field to fix.
 * @returns {{body: Record<string, unknown>} | {error: string, field: string}}
 */
export function readForm() {
  const prompt = $('prompt').value;
  if (prompt.trim() === '') return { error: 'Write a prompt first.', field: 'prompt' };
  /** @type {Record<string, unknown>} */
  const body = { prompt };
  const negative = $('negative_prompt').value;
  if (negative !== '') body.negative_prompt = negative;
  for (const [id, integer] of [['seed', true], ['steps', true], ['scale', false], ['width', true], ['height', true]]) {
    const v = numberField(id);
    if (v === undefined) continue;
    if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) return { error: `${$(id).labels[0].textContent}: expected ${integer ? 'a whole number' : 'a number'}.`, field: id };
    body[id] = v;
  }
  if ($('sampler').value !== '') body.sampler = $('sampler').value;
  if ($('karras').checked) body.karras = true;
  if (initImage !== null) {
    body.init_image = initImage;
    body.strength = Number($('strength').value);
  }
  return { body };
}

/** Fill the form from an image's parameters (those of a result or a gallery item). @param {Record<string, any>} p */
export function fillForm(p) {
  $('prompt').value = p.prompt ?? '';
  $('negative_prompt').value = p.negative_prompt ?? '';
  for (const id of ['seed', 'steps', 'scale', 'width', 'height']) if (p[id] !== undefined) $(id).value = String(p[id]);
  if (p.sampler !== undefined) $('sampler').value = p.sampler;
  $('karras').checked = p.karras === true;
  if (typeof p.strength === 'number') setStrength(p.strength);
}

function setStrength(v) {
  $('strength').value = String(v);
  $('strength-value').textContent = Number($('strength').value).toFixed(2);
}

function setInit(dataUrl) {
  initImage = dataUrl;
  const img = $('init-preview');
  img.hidden = dataUrl === null;
  if (dataUrl !== null) img.src = dataUrl;
  else img.removeAttribute('src');
  $('strength').disabled = dataUrl === null;
  $('clear-init').disabled = dataUrl === null;
}

/** The init image's file input, its preview, the strength slider and its "Remove" button. */
export function wireInitImage() {
  const input = $('init_image');
  input.addEventListener('change', () => {
    const file = input.files?.[0];
    if (file === undefined) return setInit(null);
    const reader = new FileReader();
    reader.addEventListener('load', () => setInit(typeof reader.result === 'string' ? reader.result : null));
    reader.addEventListener('error', () => setInit(null));
    reader.readAsDataURL(file);
  });
  $('clear-init').addEventListener('click', () => {
    input.value = '';
    setInit(null);
  });
  $('strength').addEventListener('input', () => setStrength($('strength').value));
}
