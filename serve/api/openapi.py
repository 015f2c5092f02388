"""The OpenAPI 3.1 document, generated from the route table and the pydantic models, and a docs
page that renders it with no network access (no CDN assets)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from serve.api.schemas import ErrorEnvelope

_ERRORS = {"400": "Invalid request", "401": "Missing or invalid credentials", "403": "Needs the admin role",
           "404": "Not found (including another user's video)", "413": "Request body too large",
           "422": "Validation error naming the field", "429": "Rate or concurrency limit, or too many failed sign-ins (see Retry-After)",
           "503": "A service the request needs is unavailable", "507": "The server's storage is full"}


def _form_schema(schema: dict) -> dict:
    """A model's schema as a multipart form carries it: a form field has no `null` (leave it out),
    and a field that takes an upload (`x-upload`) is a part of text (a file's bytes, or in the form
    a data URL / a video id)."""
    props = {}
    for name, prop in schema.get("properties", {}).items():
        if prop.get("x-upload"):  # a file part (a part's text, in OpenAPI terms; `format: binary` trips Schemathesis)
            props[name] = {"type": "string", "description": prop.get("description", "")}
            continue
        options = prop.get("anyOf")
        if options:
            kept = [o for o in options if o.get("type") != "null"]
            prop = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
        props[name] = prop
    return {**schema, "properties": props}


def build_openapi(routes, version: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_ref = ref(ErrorEnvelope)
    paths: dict[str, dict] = {}
    for r in routes:
        if not r.in_schema:
            continue
        for method in r.methods:
            op: dict[str, Any] = {"summary": r.summary, "operationId": f"{method.lower()}_{r.endpoint.__name__}"}
            params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                      for n in re.findall(r"{(\w+)}", r.path)]
            params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in r.query.items()]
            if params:
                op["parameters"] = params
            if r.req is not None:
                content = {"application/json": {"schema": ref(r.req)}}
                if r.form:
                    form = _form_schema(r.req.model_json_schema(ref_template="#/components/schemas/{model}"))
                    form.pop("$defs", None)
                    content["multipart/form-data"] = {"schema": form}
                op["requestBody"] = {"required": not r.body_optional, "content": content}
            ok: dict[str, Any] = {"description": "OK"}
            if r.resp is not None:
                ok["content"] = {"application/json": {"schema": ref(r.resp)}}
            elif r.content:  # one or more media types, space-separated
                ok["content"] = {media: {} for media in r.content.split()}
            op["responses"] = {str(r.status): ok, **{code: {"description": d, "content": {
                "application/json": {"schema": error_ref}}} for code, d in {**_ERRORS, **r.errors}.items()}}
            if r.auth:
                op["security"] = [{"bearer": []}]
            paths.setdefault(r.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "CineVivid", "version": version,
                 "description": "Text-to-video with SkyReels-V2 on Ray Serve. OpenAI Videos API compatible."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "A JWT from /auth/login or an API key cv-..."}}},
    }


DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CineVivid API</title>
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
.op{border:1px solid #ddd;border-radius:6px;margin:.5rem 0;padding:.5rem .8rem}
.m{display:inline-block;min-width:4.5rem;font-weight:bold;font-family:monospace}
.get{color:#1a7f37}.post{color:#0969da}.delete{color:#cf222e}
code,pre{background:#f6f8fa;border-radius:4px;padding:.1rem .3rem}pre{padding:.6rem;overflow:auto}
details summary{cursor:pointer}
</style></head><body>
<h1>CineVivid API</h1>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>. Authenticate with
<code>Authorization: Bearer &lt;JWT or API key&gt;</code>. Errors:
<code>{"error": {"code", "message", "param"}}</code>.</p>
<div id="ops">Loading…</div>
<script>
fetch('openapi.json').then(r => r.json()).then(spec => {
  const root = document.getElementById('ops'); root.textContent = '';
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const d = document.createElement('div'); d.className = 'op';
      const h = document.createElement('div');
      h.innerHTML = `<span class="m ${method}">${method.toUpperCase()}</span> <code></code> `;
      h.querySelector('code').textContent = path;
      h.append(document.createTextNode(op.summary || ''));
      d.append(h);
      const det = document.createElement('details');
      const s = document.createElement('summary'); s.textContent = 'schema'; det.append(s);
      const pre = document.createElement('pre'); pre.textContent = JSON.stringify(op, null, 2); det.append(pre);
      d.append(det); root.append(d);
    }
  }
}).catch(e => { document.getElementById('ops').textContent = 'could not load openapi.json: ' + e; });
</script></body></html>
"""
