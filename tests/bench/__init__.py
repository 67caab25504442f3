"""The benchmark against docker-registry in proxy mode (`make bench`)."""
