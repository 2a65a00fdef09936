"""One APIRouter per resource; service.app includes every router listed in ROUTER_MODULES."""
