"""Local tooling for tests and the demo: a real Kubernetes control plane on 127.0.0.1."""
