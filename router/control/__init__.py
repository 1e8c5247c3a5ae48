"""The control plane applied to a running router: deployments created, scaled and deleted at
run time from the registry (router/registry/), restored at start."""
