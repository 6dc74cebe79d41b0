/* New campaign and Edit template (services/api/console/new_campaign.py): the upload's size check, the column
   choices, the template editor's live parts (variables inserted at the cursor, SMS encoding and segments, the
   missing variables, the preview with the first contact's values) and the import report's own refresh.
   Plain ES, no build step. The server renders every part first, so a page works without this file.

   The rules are the project's (services/common/templating.py). The GSM-7 tables and segment sizes come from
   the page (data-rules, made by template_form.sms_rules), never written here; the pure functions below are
   exported for node, and tests/test_console_new_campaign.py checks they agree with the Python ones. */
(function () {
  "use strict";

  // templating._PLACEHOLDER_RE, with Python's \s spelled out (JavaScript's \s differs in a few characters).
  const SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
  const PLACEHOLDER = new RegExp("\\{\\{[ \\t]*([^{}" + SPACE + "](?:[^{}\\r\\n]*[^{}" + SPACE + "])?)[ \\t]*\\}\\}", "gu");

  function placeholders(text) {
    const names = [];
    for (const match of text.matchAll(PLACEHOLDER)) {
      if (!names.includes(match[1])) names.push(match[1]);
    }
    return names;
  }

  function valueOf(variables, name) {
    if (!variables || !Object.prototype.hasOwnProperty.call(variables, name)) return null;
    const value = variables[name];
    if (value === null || value === undefined) return null;
    const text = String(value);
    return text === "" ? null : text;
  }

  // html.escape(value, quote=True)
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#x27;");
  }

  // templating.render (escape: false) and the HTML body of templating.render_email (escape: true)
  function render(text, variables, escape) {
    return text.replace(PLACEHOLDER, function (match, name) {
      const value = valueOf(variables, name);
      if (value === null) return match;
      return escape ? escapeHtml(value) : value;
    });
  }

  const tables = new WeakMap();
  function gsm(rules) {
    if (!tables.has(rules)) {
      const extension = new Set(rules.extension);
      tables.set(rules, {all: new Set(rules.basic + rules.extension), extension: extension});
    }
    return tables.get(rules);
  }

  function smsEncoding(text, rules) {
    const all = gsm(rules).all;
    for (const character of text) {
      if (!all.has(character)) return "UCS-2";
    }
    return "GSM-7";
  }

  // GSM-7 septets (extension characters two), or UTF-16 code units for UCS-2
  function smsLength(text, rules) {
    if (smsEncoding(text, rules) === "UCS-2") return text.length;
    const extension = gsm(rules).extension;
    let septets = 0;
    for (const character of text) septets += extension.has(character) ? 2 : 1;
    return septets;
  }

  function smsSegments(text, rules) {
    const gsm7 = smsEncoding(text, rules) === "GSM-7";
    const length = smsLength(text, rules);
    const single = gsm7 ? rules.gsm7_single : rules.ucs2_single;
    const multi = gsm7 ? rules.gsm7_multi : rules.ucs2_multi;
    return length <= single ? 1 : Math.ceil(length / multi);
  }

  // template_form.SmsMeter.describe
  function describe(text, rules) {
    const encoding = smsEncoding(text, rules);
    const length = smsLength(text, rules);
    const segments = smsSegments(text, rules);
    const per = segments > 1 ? " of " + (encoding === "GSM-7" ? rules.gsm7_multi : rules.ucs2_multi) : "";
    return encoding + ", " + length + " character" + (length === 1 ? "" : "s") + ", " + segments + " segment" +
      (segments === 1 ? "" : "s") + per;
  }

  // csv_mapping.VariableProfile.missing
  function missingVariables(text, profile) {
    const report = [];
    for (const name of placeholders(text)) {
      const mapped = Object.prototype.hasOwnProperty.call(profile.present, name);
      const count = mapped ? profile.contacts - profile.present[name] : profile.contacts;
      if (count) {
        report.push({variable: name, count: count, first_rows: (mapped ? profile.missing_rows[name] : profile.first_rows).slice(),
                     mapped: mapped});
      }
    }
    return report;
  }

  const api = {placeholders: placeholders, render: render, escapeHtml: escapeHtml, smsEncoding: smsEncoding,
               smsLength: smsLength, smsSegments: smsSegments, describe: describe, missingVariables: missingVariables};
  if (typeof module !== "undefined" && module.exports) module.exports = api;
  if (typeof document === "undefined") return;

  // ---------------------------------------------------------------- pages

  // A form is sent once: a double click does not send it twice (the server is idempotent anyway).
  // A long step (a 300,000-row file is read whole) says it is under way.
  for (const form of document.querySelectorAll("form.once")) {
    form.addEventListener("submit", function (event) {
      if (form.dataset.sent) event.preventDefault();
      form.dataset.sent = "true";
      const busy = form.querySelector(".busy");
      const action = event.submitter ? event.submitter.value : "";
      if (busy && !event.defaultPrevented && action !== "preview") busy.hidden = false;
    });
  }
  window.addEventListener("pageshow", function () {
    for (const form of document.querySelectorAll("form.once")) delete form.dataset.sent;
  });

  const upload = document.getElementById("upload-form");
  if (upload) {
    upload.addEventListener("submit", function (event) {
      const file = upload.elements.contacts.files[0];
      const max = Number(upload.dataset.maxBytes);
      const problem = document.getElementById("upload-problem");
      if (file && file.size > max) {
        event.preventDefault();
        delete upload.dataset.sent;
        upload.querySelector(".busy").hidden = true;
        problem.textContent = "The file is " + (file.size / 1048576).toFixed(1) + " MB: at most " +
          Math.floor(max / 1048576) + " MB.";
        problem.hidden = false;
      }
    });
  }

  const columns = document.getElementById("columns-form");
  if (columns) {
    const selects = Array.from(columns.querySelectorAll("select[data-column]"));
    const sync = function () {
      for (const select of selects) {
        const name = document.getElementById("variable_" + select.dataset.column);
        if (name) name.disabled = select.value !== "variable";
      }
    };
    for (const select of selects) {
      select.addEventListener("change", function () {
        if (select.value === "destination") {  // exactly one: the one chosen before is no longer imported
          for (const other of selects) {
            if (other !== select && other.value === "destination") other.value = "skip";
          }
        }
        sync();
      });
    }
    sync();
  }

  const refresh = document.querySelector("[data-refresh-seconds]");
  if (refresh) setTimeout(function () { window.location.reload(); }, Number(refresh.dataset.refreshSeconds) * 1000);

  const editor = document.getElementById("template-editor");
  if (!editor) return;
  const channel = editor.dataset.channel;
  const profile = JSON.parse(editor.dataset.profile);
  const rules = JSON.parse(editor.dataset.rules);
  const values = (profile.sample && profile.sample.variables) || {};
  const fields = Array.from(editor.querySelectorAll("[data-template-field]"));
  let lastField = fields[0];
  const form = editor.closest("form");

  function field(name) { return form.elements[name] ? form.elements[name].value : ""; }

  function showMissing(missing) {
    const box = document.getElementById("missing-variables");
    box.replaceChildren();
    if (!missing.length) {
      const fine = document.createElement("p");
      fine.className = "done";
      fine.textContent = "Every placeholder has a value for every contact.";
      box.append(fine);
    } else {
      const warning = document.createElement("div");
      warning.className = "missing";
      const lead = document.createElement("p");
      const strong = document.createElement("strong");
      strong.textContent = "Missing variables:";
      lead.append(strong, " these placeholders have no value for some contacts and stay as written there.");
      const list = document.createElement("ul");
      for (const m of missing) {
        const item = document.createElement("li");
        const code = document.createElement("code");
        code.textContent = "{{" + m.variable + "}}";
        const more = m.count > m.first_rows.length ? ", …" : "";
        item.append(code, m.mapped
          ? ": empty for " + m.count + " of " + profile.contacts + " contacts (row" + (m.count > 1 ? "s " : " ") + m.first_rows.join(", ") + more + ")"
          : ": no column is mapped to it: stays as written in " + (m.count === 1 ? "the only message" : "all " + m.count + " messages"));
        list.append(item);
      }
      warning.append(lead, list);
      box.append(warning);
    }
    document.getElementById("accept-missing").hidden = !missing.length;
  }

  function update() {
    if (channel === "sms") {
      const body = field("body");
      const rendered = render(body, values, false);
      document.getElementById("sms-meter").textContent = "As written: " + describe(body, rules) +
        ". For the first contact: " + describe(rendered, rules) + ".";
      document.getElementById("sms-preview").textContent = rendered;
      showMissing(missingVariables(body, profile));
      return;
    }
    const subject = field("subject");
    const html = field("html");
    document.getElementById("email-preview-subject").textContent = render(subject, values, false);
    const fromName = field("from_name").trim();
    const fromEmail = field("from_email").trim();
    document.getElementById("email-preview-from").textContent = fromName ? fromName + " <" + fromEmail + ">" : fromEmail;
    document.getElementById("email-preview-reply").textContent = field("reply_to").trim() || "(the sender)";
    const names = Array.from(form.querySelectorAll("input[name=attachment_filename]"))
      .map(function (input) { return input.value.trim(); }).filter(Boolean);
    document.getElementById("email-preview-attachments").textContent = names.join(", ") || "none";
    showEmailBody(render(html, values, true));
    showMissing(missingVariables(subject + "\n" + html, profile));
  }

  // The email body in a sandboxed frame, as the server reduces it (template_form.preview_html: text and
  // structure): the frame inherits the console's Content-Security-Policy, which refuses the email's styles and
  // outside images, and the console fetches nothing from outside. Asked once typing pauses.
  let previewTimer = null;
  let previewAsked = 0;
  function showEmailBody(html) {
    clearTimeout(previewTimer);
    previewTimer = setTimeout(function () {
      const asked = ++previewAsked;
      fetch(editor.dataset.previewUrl, {
        method: "POST", credentials: "same-origin",
        headers: {"X-CSRF-Token": form.elements.csrf_token.value},
        body: new URLSearchParams({html: html}),
      }).then(function (answer) {
        return answer.ok ? answer.text() : null;
      }).then(function (reduced) {
        if (reduced !== null && asked === previewAsked) {
          document.getElementById("email-preview-body").srcdoc = "<!doctype html><html><body>" + reduced + "</body></html>";
        }
      }).catch(function () { /* the preview stays as it was; the page works without it */ });
    }, 300);
  }

  for (const input of fields) {
    input.addEventListener("focus", function () { lastField = input; });
  }
  form.addEventListener("input", update);

  const buttons = document.getElementById("variable-buttons");
  if (buttons) {
    buttons.hidden = false;
    buttons.addEventListener("click", function (event) {
      const button = event.target.closest("button[data-variable]");
      if (!button || !lastField) return;
      const text = "{{" + button.dataset.variable + "}}";
      const start = lastField.selectionStart ?? lastField.value.length;
      const end = lastField.selectionEnd ?? start;
      lastField.setRangeText(text, start, end, "end");
      lastField.focus();
      update();
    });
  }

  const addAttachment = document.getElementById("add-attachment");
  if (addAttachment) {
    addAttachment.hidden = false;
    addAttachment.addEventListener("click", function () {
      const rows = editor.querySelector(".attachment-rows tbody");
      const copy = rows.lastElementChild.cloneNode(true);
      const number = rows.children.length + 1;
      for (const control of copy.querySelectorAll("input, select")) {
        if (control.tagName === "INPUT") control.value = "";
        control.setAttribute("aria-label", control.getAttribute("aria-label").replace(/^Attachment \d+/, "Attachment " + number));
      }
      rows.append(copy);
      copy.querySelector("input").focus();
    });
  }
}());
