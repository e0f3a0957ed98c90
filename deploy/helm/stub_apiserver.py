#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server's discovery endpoints, on loopback, so that
`kubectl apply --dry-run=client --validate=false` can run without a cluster.

Even a client-side dry run asks the server which resources exist (API discovery) and
whether each object already exists (GET). This stub answers discovery for the built-in
groups the chart uses plus the Prometheus Operator's monitoring.coreos.com/v1 (as a
cluster with that CRD would), and 404 for every object, so kubectl takes its "create"
path and prints "<kind>/<name> created (dry run)". It validates nothing itself: what
kubectl checks on that path is the objects' shape (apiVersion/kind known, metadata,
namespace scoping) and the last-applied-configuration it would write.

usage: stub_apiserver.py PORT_FILE   (binds 127.0.0.1:0, writes the port, serves forever)
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# group/version -> [(resource, kind, namespaced)]
RESOURCES = {
    "v1": [("services", "Service", True), ("secrets", "Secret", True), ("serviceaccounts", "ServiceAccount", True),
           ("persistentvolumeclaims", "PersistentVolumeClaim", True), ("configmaps", "ConfigMap", True),
           ("pods", "Pod", True), ("namespaces", "Namespace", False)],
    "apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def resource_list(gv):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
            "resources": [{"name": r, "singularName": k.lower(), "namespaced": ns, "kind": k, "verbs": VERBS}
                          for r, k, ns in RESOURCES[gv]]}


def group_list():
    groups = []
    for gv in RESOURCES:
        if "/" not in gv:
            continue
        group, version = gv.split("/")
        v = {"groupVersion": gv, "version": version}
        groups.append({"name": group, "versions": [v], "preferredVersion": v})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                    "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            return self._send(200, group_list())
        if path == "/api/v1":
            return self._send(200, resource_list("v1"))
        if path.startswith("/apis/") and path.count("/") == 3 and path[len("/apis/"):] in RESOURCES:
            return self._send(200, resource_list(path[len("/apis/"):]))
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-stub"})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": f"{path} not found (stub)"})

    def log_message(self, *args):
        pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
