"""AdaptersService: thin gRPC wrapper over AdapterAdmin.

Which roles may call each RPC is decided before a handler runs (auth.RPC_ROLES); here only what a
tenant key sees is narrowed: ListAdapters and GetAdapter show a tenant its own adapters only.
"""

from __future__ import annotations

import asyncio

import grpc

from lorafleet_adapters.ref import AdapterRef, check_ident
from lorafleet_proto.v1 import adapters_pb2, adapters_pb2_grpc
from lorafleet_server.edge.observe import CallObserver, CallRecord
from lorafleet_server.engine.admin import AdapterAdmin
from lorafleet_server.grpc import convert
from lorafleet_server.grpc.auth import check_admin_view, listed_tenant
from lorafleet_server.grpc.rpc import unary_rpc

MAX_PAGE_SIZE = 1000  # a larger page_size is taken as this (each adapter carries every version's manifest)


class AdaptersServicer(adapters_pb2_grpc.AdaptersServiceServicer):
    def __init__(self, admin: AdapterAdmin, calls: CallObserver) -> None:
        self._admin = admin
        self.calls = calls

    @unary_rpc("ListAdapters")
    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.ListAdaptersResponse:
        if request.tenant:
            check_ident(request.tenant, "tenant")  # a bad name is INVALID_ARGUMENT for every caller
        after = convert.page_cursor(request.page_token)  # a bad token is INVALID_ARGUMENT for every caller
        tenant = listed_tenant(record.principal, request.tenant)
        if tenant is None:  # another tenant's: empty, as a tenant without adapters
            return adapters_pb2.ListAdaptersResponse()
        # 0: everything, the contract before pages (a client that knows no page_size would see only the
        # first page and take it for the whole store); the Python clients ask for pages.
        size = min(request.page_size, MAX_PAGE_SIZE) if request.page_size else None
        views, last = await asyncio.to_thread(self._admin.page, tenant, after, size)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[convert.adapter_pb(v) for v in views], next_page_token=convert.page_token(last)
        )

    @unary_rpc("GetAdapter", adapter=True)
    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.GetAdapterResponse:
        ref = AdapterRef.parse(request.adapter)
        if ref.version is None:  # with a version every caller gets the same INVALID_ARGUMENT below
            check_admin_view(record.principal, ref)
        view = await asyncio.to_thread(self._admin.get, request.adapter)
        return adapters_pb2.GetAdapterResponse(adapter=convert.adapter_pb(view))

    @unary_rpc("LoadAdapter", adapter=True)
    async def LoadAdapter(
        self, request: adapters_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.LoadAdapterResponse:
        key, tier = await asyncio.to_thread(self._admin.load, request.adapter)
        return adapters_pb2.LoadAdapterResponse(adapter=str(key), tier=convert.TIERS[tier])

    @unary_rpc("UnloadAdapter", adapter=True)
    async def UnloadAdapter(
        self, request: adapters_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.UnloadAdapterResponse:
        key, freed = await asyncio.to_thread(self._admin.unload, request.adapter)
        return adapters_pb2.UnloadAdapterResponse(adapter=str(key), unloaded=freed)

    @unary_rpc("PinAdapter", adapter=True)
    async def PinAdapter(
        self, request: adapters_pb2.PinAdapterRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.PinAdapterResponse:
        key = await asyncio.to_thread(self._admin.pin, request.adapter)
        return adapters_pb2.PinAdapterResponse(adapter=str(key))

    @unary_rpc("UnpinAdapter", adapter=True)
    async def UnpinAdapter(
        self, request: adapters_pb2.UnpinAdapterRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.UnpinAdapterResponse:
        key = await asyncio.to_thread(self._admin.unpin, request.adapter)
        return adapters_pb2.UnpinAdapterResponse(adapter=str(key))

    @unary_rpc("RefreshAdapters")
    async def RefreshAdapters(
        self, request: adapters_pb2.RefreshAdaptersRequest, context: grpc.aio.ServicerContext, record: CallRecord
    ) -> adapters_pb2.RefreshAdaptersResponse:
        result = await asyncio.to_thread(self._admin.refresh)
        return adapters_pb2.RefreshAdaptersResponse(
            swaps=[
                adapters_pb2.AdapterSwap(adapter=s.adapter, from_version=s.from_version, to_version=s.to_version)
                for s in result.swaps
            ],
            failures=[
                adapters_pb2.AdapterSwapFailure(adapter=f.adapter, version=f.version, error=f.error)
                for f in result.failures
            ],
        )
