"""``task=tabular``: a site's own table + a schema, federated preprocessing, pooled test metrics."""
