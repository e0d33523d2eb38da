check:
	scripts/check

bootstrap:
	scripts/bootstrap

.PHONY: check bootstrap
