#!/usr/bin/python3
"""Checks deploy/ghz/*.json the way ghz v0.121.0 would read them, without ghz.

usage: check_configs.py PROTOC PROTO_ROOT CONFIG.json...

ghz is not packaged for Debian and cannot be fetched here, so this script stands in for
its config loader:
  - every key is one of ghz's config keys (the json tags of runner.Config in v0.121.0),
    with the type ghz decodes it into (Go durations, unsigned counts, enums);
  - no "proto"/"protoset"/"import-paths": the configs must work through server reflection;
  - "call" names a server-streaming method of the proto (package.Service.Method or
    package.Service/Method) whose input is kvgate.v1.GenerateRequest;
  - every "data" message (one object, or an array that ghz sends round-robin) parses as
    that message with the proto3 JSON mapping (unknown fields are errors), after the
    template actions ghz would fill ({{.RequestNumber}}, {{.WorkerID}}, {{env "X"}}, ...)
    are given sample values; the prompt oneof is set and the policy is a known name.
Needs Debian's python3-protobuf (run with /usr/bin/python3).
"""
import json
import os
import re
import subprocess
import sys
import tempfile

from google.protobuf import descriptor_pb2, descriptor_pool, json_format
try:
    from google.protobuf import message_factory
    def message_class(desc):
        if hasattr(message_factory, "GetMessageClass"):
            return message_factory.GetMessageClass(desc)
        return message_factory.MessageFactory().GetPrototype(desc)
except ImportError:  # pragma: no cover
    raise

DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
# key -> type: "str", "bool", "uint", "int", "duration", "obj", "map", "list", or a set (enum).
GHZ_KEYS = {
    "proto": "str", "protoset": "str", "call": "str", "cacert": "str", "cert": "str", "key": "str",
    "count-errors": "bool", "skipTLS": "bool", "skipFirst": "uint", "cname": "str", "authority": "str",
    "insecure": "bool", "total": "uint", "async": "bool", "concurrency": "uint",
    "concurrency-schedule": {"const", "step", "line"}, "concurrency-start": "uint", "concurrency-end": "uint",
    "concurrency-step": "int", "concurrency-step-duration": "duration", "concurrency-max-duration": "duration",
    "connections": "uint", "rps": "uint", "duration": "duration", "duration-stop": {"close", "ignore", "wait"},
    "max-duration": "duration", "timeout": "duration", "data": "obj", "data-file": "str", "binary-file": "str",
    "metadata": "map", "metadata-file": "str", "stream-interval": "duration", "stream-call-duration": "duration",
    "stream-call-count": "uint", "stream-dynamic-messages": "bool", "output": "str",
    "format": {"summary", "csv", "json", "pretty", "html", "influx-summary", "influx-details", "prometheus"},
    "connect-timeout": "duration", "keepalive": "duration", "cpus": "uint", "import-paths": "list",
    "name": "str", "tags": "map", "reflect-metadata": "map", "debug": "str", "host": "str",
    "enable-compression": "bool", "load-schedule": {"const", "step", "line"}, "load-start": "uint",
    "load-end": "uint", "load-step": "int", "load-step-duration": "duration", "load-max-duration": "duration",
    "lb-strategy": "str", "max-recv-message-size": "str", "max-send-message-size": "str",
    "disable-template-functions": "bool", "disable-template-data": "bool",
}
POLICIES = {"", "full", "streaming_llm", "snapkv", "sage_kv", "kvzip", "fast_kvzip", "attention_gate"}
TEMPLATE_VALUES = {
    ".RequestNumber": "7", ".WorkerID": "g1c0", ".UUID": "0f8fad5b-d9cb-469f-a165-70867728950e",
    ".FullyQualifiedName": "kvgate.v1.Inference.Generate", ".MethodName": "Generate",
    ".ServiceName": "kvgate.v1.Inference", ".InputName": "kvgate.v1.GenerateRequest",
    ".OutputName": "kvgate.v1.GenerateResponse", ".IsClientStreaming": "false", ".IsServerStreaming": "true",
    ".Timestamp": "2026-12-04T00:00:00Z", ".TimestampUnix": "1796342400",
}


def fill_templates(text):
    def action(m):
        body = m.group(1).strip()
        if body in TEMPLATE_VALUES:
            return TEMPLATE_VALUES[body]
        if body.startswith("env "):
            return "sample-" + body[4:].strip().strip('"\\')
        if body.startswith(("randomString", "newUUID", "randomInt", "randAlphaNum")):
            return "5"
        raise ValueError(f"unknown template action {{{{{body}}}}}")
    return re.sub(r"\{\{(.*?)\}\}", action, text)


def fill(value):
    if isinstance(value, str):
        return fill_templates(value)
    if isinstance(value, list):
        return [fill(v) for v in value]
    if isinstance(value, dict):
        return {k: fill(v) for k, v in value.items()}
    return value


def load_pool(protoc, root):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "set.pb")
        subprocess.run([protoc, f"-I{root}", "--include_imports", f"--descriptor_set_out={out}",
                        "kvgate/v1/inference.proto"], check=True)
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return pool


def check_type(key, kind, value):
    if isinstance(kind, set):
        return value in kind, f"one of {sorted(kind)}"
    checks = {
        "str": (lambda v: isinstance(v, str), "a string"),
        "bool": (lambda v: isinstance(v, bool), "true or false"),
        "uint": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a count >= 0"),
        "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "duration": (lambda v: isinstance(v, str) and (v == "0" or DURATION.match(v)), "a Go duration"),
        "obj": (lambda v: isinstance(v, (dict, list)), "an object or array"),
        "map": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "string map"),
        "list": (lambda v: isinstance(v, list), "a list"),
    }
    ok, what = checks[kind]
    return bool(ok(value)), what


def check_config(path, pool):
    errors = []
    cfg = json.load(open(path))
    for key, value in cfg.items():
        if key not in GHZ_KEYS:
            errors.append(f"unknown ghz key '{key}'")
            continue
        ok, what = check_type(key, GHZ_KEYS[key], value)
        if not ok:
            errors.append(f"'{key}' must be {what}, got {value!r}")
    for key in ("proto", "protoset", "import-paths"):
        if key in cfg:
            errors.append(f"'{key}' given: the configs must work through server reflection alone")
    if not cfg.get("host"):
        errors.append("no 'host'")
    if not (cfg.get("insecure") or cfg.get("cacert") or cfg.get("skipTLS")):
        errors.append("neither 'insecure' nor TLS ('cacert'/'skipTLS')")
    if cfg.get("insecure") and cfg.get("cacert"):
        errors.append("'insecure' together with 'cacert'")
    if not (cfg.get("total") or cfg.get("duration")):
        errors.append("neither 'total' nor 'duration': ghz would run its default 200 calls")
    call = cfg.get("call", "")
    m = re.match(r"^([\w.]+)[./](\w+)$", call)
    if not m:
        return errors + [f"'call' {call!r} is not package.Service.Method"]
    try:
        service = pool.FindServiceByName(m.group(1))
    except KeyError:
        return errors + [f"no service {m.group(1)} in the proto"]
    method = service.methods_by_name.get(m.group(2))
    if method is None:
        return errors + [f"no method {m.group(2)} in {service.full_name}"]
    # Python protobuf 3.21 descriptors lack client/server_streaming: read the proto form.
    mproto = descriptor_pb2.MethodDescriptorProto()
    method.CopyToProto(mproto)
    if not mproto.server_streaming or mproto.client_streaming:
        errors.append(f"{call} is not server-streaming")
    cls = message_class(method.input_type)
    data = cfg.get("data")
    items = data if isinstance(data, list) else [data]
    if not items or data is None:
        errors.append("no 'data'")
    for i, item in enumerate(items):
        try:
            msg = json_format.ParseDict(fill(item), cls())
        except (json_format.ParseError, ValueError) as e:
            errors.append(f"data[{i}] is not a {method.input_type.full_name}: {e}")
            continue
        if msg.WhichOneof("prompt") is None:
            errors.append(f"data[{i}] sets neither text nor tokens")
        if msg.compression.policy not in POLICIES:
            errors.append(f"data[{i}] policy '{msg.compression.policy}' is not a kvgate policy")
    return errors


def main():
    protoc, root, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
    if not configs:
        print("no configs given", file=sys.stderr)
        return 1
    pool = load_pool(protoc, root)
    passed = failed = 0
    for path in configs:
        errors = check_config(path, pool)
        name = os.path.basename(path)
        if errors:
            failed += 1
            print(f"FAIL {name}")
            for e in errors:
                print(f"  {e}")
        else:
            passed += 1
            print(f"PASS {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
