import json
import time
import pytest

pytestmark = pytest.mark.integration


def test_explore(marketplace):
    m = marketplace
    k = m.create_key(name="x", credit_usd="1")
    print("CREATED", k)
    key = k["key"]
    def show(r):
        print(r.request.method, r.request.url.path, r.status_code, r.headers.get_list("x-request-id"), dict(r.headers), r.text[:600])
    show(m.chat(key, max_tokens=5))
    show(m.chat(key, path="/v1/completions", prompt="a b c", messages=None, max_tokens=3))
    show(m.http.post("/v1/completions", json={"model":"alpha-chat","prompt":"a b c","max_tokens":3}, headers=m.auth(key)))
    show(m.chat(key, messages="x"))
    show(m.http.post("/v1/chat/completions", content=b"{nope", headers={**m.auth(key), "content-type":"application/json"}))
    show(m.chat(key, stream_options={"include_usage": True}))
    show(m.chat(key, messages=[{"role":"wizard","content":"hi"}]))
    show(m.chat(key, model="nope"))
    show(m.http.get("/nope"))
    show(m.http.get("/v1/models"))
    show(m.chat(key, messages=[{"role":"user","content":"[[fake-error]] x"}]))
    show(m.chat(key, messages=[{"role":"user","content":"[[fake-error]] x"}], stream=True))
    show(m.http.get("/v1/usage", headers=m.auth(key)))
    show(m.http.get("/v1/key", headers=m.auth(key)))
    show(m.http.get("/v1/key", headers={**m.auth(key), "x-request-id": "abc123"}))
    t=time.time()
    with m.http.stream("POST", "/v1/chat/completions", json={"model":"beta-chat","messages":[{"role":"user","content":"hi"}],"stream":True,"max_tokens":4,"stream_options":{"include_usage":True}}, headers=m.auth(key)) as r:
        print(r.status_code, r.headers)
        for line in r.iter_lines():
            print(round(time.time()-t,3), repr(line))
