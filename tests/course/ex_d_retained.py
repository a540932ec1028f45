# IV.D Gestion du message retenu -- adapted: host/port/credentials from argv.
# 1. publish a retained message on isima/GX, then subscribe: the message comes
#    back flagged as retained;
# 2. delete it with an empty retained publish, subscribe again and listen
#    --wait seconds: nothing comes.
import threading

import paho.mqtt.client as mqtt

import common

a = common.args("D: retained", lambda p: p.add_argument("--wait", type=float, default=1.0))
topic = "isima/" + a.gx
messageGX = "retained_" + a.gx
connected = threading.Event()
subscribed = threading.Event()
received = threading.Event()

def on_connect(client, userdata, flags, rc):
    print("Connected with result code => "+mqtt.connack_string(rc))
    connected.set()

def on_subscribe(client, userdata, mid, granted_qos):
    subscribed.set()

def on_message(client, userdata, msg):
    print("Received message " + str(msg.payload) + " on topic " + msg.topic + " with QoS " +
    str(msg.qos))
    if msg.retain == 1:
        print("This is a retained message")
        # Actions à réaliser si le message est un message retenu
    received.set()

def subscribe_and_listen(timeout):
    subscribed.clear()
    received.clear()
    client.subscribe(topic)
    if not subscribed.wait(10):
        raise SystemExit("no SUBACK for " + topic)
    received.wait(timeout)
    client.unsubscribe(topic)

client = mqtt.Client()
client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.username_pw_set(username=a.username, password=a.password)
client.connect(a.host, a.port)
client.loop_start()
if not connected.wait(10):
    raise SystemExit("no CONNACK")

(rc, mid) = client.publish(topic=topic, payload=messageGX, retain=True)
print("-- subscribing after the retained publish")
subscribe_and_listen(10)

(rc, mid) = client.publish(topic=topic, payload="", retain=True)
print("-- subscribing after the deletion")
subscribe_and_listen(a.wait)
print("-- done")
client.disconnect()
client.loop_stop()
