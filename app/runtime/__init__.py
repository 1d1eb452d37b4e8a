"""The processes of a run: SuperLink, SuperNodes, the site worker, deployment, preflight, PKI, data files."""
